//! The paths and roles `#[derive(Adaptable)]` reports, on every supported shape.

use std::marker::PhantomData;

use candle_core::{DType, Device, Tensor};
use peft_core::prelude::*;
use peft_core::{ModulePath, Role, Visitor};

fn layer(out: usize, inp: usize) -> Linear {
    Linear::new(Tensor::zeros((out, inp), DType::F32, &Device::Cpu).unwrap(), None)
}

/// (path, role) of every linear layer, in visiting order.
fn paths<M: PeftModel>(model: &M) -> Vec<(String, Role)> {
    model.layers().into_iter().map(|l| (l.path, l.role)).collect()
}

fn hidden(paths: &[&str]) -> Vec<(String, Role)> {
    paths.iter().map(|p| (p.to_string(), Role::Hidden)).collect()
}

#[derive(Adaptable)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
}

#[derive(Adaptable)]
struct Block {
    self_attn: Attention,
    norm: candle_nn::RmsNorm,
    scale: f64,
}

#[derive(Adaptable)]
struct Model {
    embed_tokens: candle_nn::Embedding,
    layers: Vec<Block>,
    #[output_head]
    lm_head: Linear,
}

fn block() -> Block {
    Block {
        self_attn: Attention {
            q_proj: layer(2, 2),
            k_proj: layer(2, 2),
        },
        norm: candle_nn::RmsNorm::new(Tensor::ones(2, DType::F32, &Device::Cpu).unwrap(), 1e-5),
        scale: 1.0,
    }
}

#[test]
fn nested_structs_and_vec_give_dotted_paths_and_the_head_role() {
    let model = Model {
        embed_tokens: candle_nn::Embedding::new(Tensor::zeros((5, 2), DType::F32, &Device::Cpu).unwrap(), 2),
        layers: vec![block(), block()],
        lm_head: layer(5, 2),
    };
    let mut expected = hidden(&[
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.k_proj",
        "layers.1.self_attn.q_proj",
        "layers.1.self_attn.k_proj",
    ]);
    expected.push(("lm_head".into(), Role::OutputHead));
    assert_eq!(paths(&model), expected);
}

#[derive(Adaptable)]
struct Pair(Linear, #[adapt(rename = "second")] Linear);

#[derive(Adaptable)]
struct Containers {
    pair: Pair,
    maybe: Option<Linear>,
    absent: Option<Linear>,
    boxed: Box<Linear>,
    array: [Linear; 2],
    tuple: (Linear, f32),
    #[adapt(rename = "h")]
    blocks: Vec<Attention>,
    #[adapt(skip)]
    #[allow(dead_code)]
    cache: Vec<Linear>,
}

#[test]
fn tuple_option_box_array_rename_and_skip() {
    let model = Containers {
        pair: Pair(layer(1, 1), layer(1, 1)),
        maybe: Some(layer(1, 1)),
        absent: None,
        boxed: Box::new(layer(1, 1)),
        array: [layer(1, 1), layer(1, 1)],
        tuple: (layer(1, 1), 0.5),
        blocks: vec![Attention {
            q_proj: layer(1, 1),
            k_proj: layer(1, 1),
        }],
        cache: vec![layer(1, 1)],
    };
    assert_eq!(
        paths(&model),
        hidden(&[
            "pair.0",
            "pair.second",
            "maybe",
            "boxed",
            "array.0",
            "array.1",
            "tuple.0",
            "h.0.q_proj",
            "h.0.k_proj",
        ])
    );
}

/// `U` is used only by a skipped field and `P` only in `PhantomData`: neither
/// needs to be `Adaptable` (the derive bounds only `T` and `H`).
#[derive(Adaptable)]
struct Generic<'a, T, H, U, P, const N: usize> {
    inner: [T; N],
    borrowed: &'a mut Linear,
    #[output_head]
    head: H,
    #[adapt(skip)]
    #[allow(dead_code)]
    other: U,
    marker: PhantomData<P>,
}

struct NotAdaptable;

#[test]
fn generic_struct_with_lifetime_and_const_param() {
    let mut borrowed = layer(1, 1);
    let model: Generic<'_, Attention, Linear, NotAdaptable, NotAdaptable, 1> = Generic {
        inner: [Attention {
            q_proj: layer(1, 1),
            k_proj: layer(1, 1),
        }],
        borrowed: &mut borrowed,
        head: layer(1, 1),
        other: NotAdaptable,
        marker: PhantomData,
    };
    let mut expected = hidden(&["inner.0.q_proj", "inner.0.k_proj", "borrowed"]);
    expected.push(("head".into(), Role::OutputHead));
    assert_eq!(paths(&model), expected);
}

#[derive(Adaptable)]
struct GatedMlp {
    gate: Linear,
    up: Linear,
}

#[derive(Adaptable)]
enum Mlp {
    /// A newtype variant adds no segment.
    Gated(GatedMlp),
    Plain {
        fc: Linear,
        #[adapt(output_head)]
        out: Linear,
    },
    Pair(Linear, Linear),
    Identity,
}

#[derive(Adaptable)]
struct EnumHolder {
    mlp: Vec<Mlp>,
}

#[test]
fn enums_visit_the_active_variant() {
    let model = EnumHolder {
        mlp: vec![
            Mlp::Gated(GatedMlp {
                gate: layer(1, 1),
                up: layer(1, 1),
            }),
            Mlp::Plain {
                fc: layer(1, 1),
                out: layer(1, 1),
            },
            Mlp::Pair(layer(1, 1), layer(1, 1)),
            Mlp::Identity,
        ],
    };
    let mut expected = hidden(&["mlp.0.gate", "mlp.0.up", "mlp.1.fc"]);
    expected.push(("mlp.1.out".into(), Role::OutputHead));
    expected.extend(hidden(&["mlp.2.0", "mlp.2.1"]));
    assert_eq!(paths(&model), expected);
}

#[test]
fn raw_identifiers_lose_their_prefix() {
    #[derive(Adaptable)]
    struct Raw {
        r#type: Linear,
    }
    assert_eq!(paths(&Raw { r#type: layer(1, 1) }), hidden(&["type"]));
}

#[test]
fn enter_and_exit_hooks_carry_the_path() {
    #[derive(Default)]
    struct Trace(Vec<String>);
    impl<'a> Visitor<'a> for Trace {
        fn enter_module(&mut self, path: &ModulePath) {
            self.0.push(format!("> {path}"));
        }
        fn exit_module(&mut self, path: &ModulePath) {
            self.0.push(format!("< {path}"));
        }
        fn visit_tensor(&mut self, path: &ModulePath, _: &'a Tensor) {
            self.0.push(format!("tensor {path}"));
        }
    }
    let model = Block {
        self_attn: Attention {
            q_proj: layer(1, 1),
            k_proj: layer(1, 1),
        },
        norm: candle_nn::RmsNorm::new(Tensor::ones(1, DType::F32, &Device::Cpu).unwrap(), 1e-5),
        scale: 1.0,
    };
    let mut trace = Trace::default();
    peft_core::Adaptable::visit(&model, &mut ModulePath::new(), &mut trace);
    assert_eq!(
        trace.0,
        [
            "> self_attn",
            "> self_attn.q_proj",
            "< self_attn.q_proj",
            "> self_attn.k_proj",
            "< self_attn.k_proj",
            "< self_attn",
            "> norm",
            "tensor norm.weight",
            "< norm",
            "> scale",
            "< scale",
        ]
    );
}

#[test]
fn mutable_visit_reaches_the_same_layers() {
    let mut model = Containers {
        pair: Pair(layer(1, 1), layer(1, 1)),
        maybe: None,
        absent: None,
        boxed: Box::new(layer(1, 1)),
        array: [layer(1, 1), layer(1, 1)],
        tuple: (layer(1, 1), 0.5),
        blocks: vec![],
        cache: vec![],
    };
    let shared = paths(&model);
    let mutable: Vec<(String, Role)> = model.layers_mut().into_iter().map(|l| (l.path, l.role)).collect();
    assert_eq!(shared, mutable);
}

#[test]
fn models_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Model>();
    assert_send_sync::<Linear>();
}

#[test]
fn an_optional_or_boxed_head_keeps_its_role() {
    #[derive(Adaptable)]
    struct Tied {
        body: Linear,
        #[output_head]
        head: Option<Box<Linear>>,
    }
    let model = Tied {
        body: layer(1, 1),
        head: Some(Box::new(layer(1, 1))),
    };
    let mut expected = hidden(&["body"]);
    expected.push(("head".into(), Role::OutputHead));
    assert_eq!(paths(&model), expected);
    let tied = Tied {
        body: layer(1, 1),
        head: None,
    };
    assert_eq!(paths(&tied), hidden(&["body"]));
}

#[test]
fn unit_structs_and_empty_enums_derive() {
    #[derive(Adaptable)]
    struct Unit;
    #[derive(Adaptable)]
    #[allow(dead_code)]
    enum Never {}
    assert!(paths(&Unit).is_empty());
    fn assert_adaptable<T: peft_core::Adaptable>() {}
    assert_adaptable::<Never>();
}
