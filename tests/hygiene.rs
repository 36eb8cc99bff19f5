//! `#[derive(Adaptable)]` must expand to code that names everything by an
//! absolute path: here the prelude's types, variants and traits are shadowed by
//! local items, and the expansion must still compile without a warning.

#![deny(warnings)]

mod shadowed {
    // Local items with the names of prelude items the expansion might use.
    #[allow(dead_code)]
    struct Result;
    #[allow(dead_code)]
    struct Option;
    #[allow(dead_code)]
    struct Some;
    #[allow(dead_code)]
    struct None;
    #[allow(dead_code)]
    struct Ok;
    #[allow(dead_code)]
    struct Err;
    #[allow(dead_code)]
    struct Box;
    #[allow(dead_code)]
    struct Vec;
    #[allow(dead_code)]
    struct Sized;
    #[allow(dead_code)]
    mod core {}
    #[allow(dead_code)]
    mod std {}
    #[allow(dead_code)]
    mod peft_core {}

    use ::candle_core::{DType, Device, Tensor};
    use ::peft_core::prelude::{Adaptable, Linear, PeftModel};
    use ::peft_core::Role;

    #[derive(Adaptable)]
    struct Attention {
        q_proj: Linear,
        // Field names that look like the expansion's own bindings.
        __path: ::std::option::Option<Linear>,
        __visitor: ::std::boxed::Box<Linear>,
    }

    #[derive(Adaptable)]
    struct Pair(Linear, #[adapt(rename = "second")] ::core::option::Option<Linear>);

    #[derive(Adaptable)]
    struct Stack<'a, T, H, const N: usize> {
        layers: [T; N],
        extra: ::std::vec::Vec<T>,
        borrowed: &'a mut Linear,
        #[output_head]
        head: H,
        tail: ::std::vec::Vec<Tail>,
        marker: ::core::marker::PhantomData<::core::result::Result<T, H>>,
    }

    // Variants named like the prelude's.
    #[derive(Adaptable)]
    enum Mlp {
        Some(Attention),
        None,
        Ok { fc: Linear, pair: Pair },
        Err(Linear, ::std::vec::Vec<Linear>),
    }

    // A newtype variant holding the head (no path segment of its own).
    #[derive(Adaptable)]
    enum Tail {
        Some(#[output_head] Linear),
        None,
    }

    // An uninhabited enum.
    #[derive(Adaptable)]
    enum Never {}

    fn layer() -> Linear {
        Linear::new(
            Tensor::zeros((1, 1), DType::F32, &Device::Cpu).unwrap(),
            ::core::option::Option::None,
        )
    }

    fn attention() -> Attention {
        Attention {
            q_proj: layer(),
            __path: ::core::option::Option::Some(layer()),
            __visitor: ::std::boxed::Box::new(layer()),
        }
    }

    #[test]
    fn derives_compile_with_prelude_names_shadowed() {
        let mut borrowed = layer();
        let model: Stack<'_, Mlp, Linear, 2> = Stack {
            layers: [
                Mlp::Some(attention()),
                Mlp::Ok {
                    fc: layer(),
                    pair: Pair(layer(), ::core::option::Option::Some(layer())),
                },
            ],
            extra: ::std::vec![Mlp::None, Mlp::Err(layer(), ::std::vec![layer()])],
            borrowed: &mut borrowed,
            head: layer(),
            tail: ::std::vec![Tail::None, Tail::Some(layer())],
            marker: ::core::marker::PhantomData,
        };
        let paths: ::std::vec::Vec<(::std::string::String, Role)> =
            model.layers().into_iter().map(|l| (l.path, l.role)).collect();
        let expected = [
            ("layers.0.q_proj", Role::Hidden),
            ("layers.0.__path", Role::Hidden),
            ("layers.0.__visitor", Role::Hidden),
            ("layers.1.fc", Role::Hidden),
            ("layers.1.pair.0", Role::Hidden),
            ("layers.1.pair.second", Role::Hidden),
            ("extra.1.0", Role::Hidden),
            ("extra.1.1.0", Role::Hidden),
            ("borrowed", Role::Hidden),
            ("head", Role::OutputHead),
            ("tail.1", Role::OutputHead),
        ];
        let expected: ::std::vec::Vec<(::std::string::String, Role)> = expected
            .iter()
            .map(|(p, r)| (::std::string::ToString::to_string(p), *r))
            .collect();
        assert_eq!(paths, expected);

        fn assert_adaptable<T: Adaptable>() {}
        assert_adaptable::<Never>();
    }
}
