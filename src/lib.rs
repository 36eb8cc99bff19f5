//! The code of the guide (`docs/guide/`), compiled and run as doctests: each
//! page is included as the documentation of one item, so every ```rust block
//! in it is a test of `cargo test --doc -p peft-examples`.

#[doc = include_str!("../docs/guide/README.md")]
#[cfg(doctest)]
pub struct GuideIndex;

#[doc = include_str!("../docs/guide/derive.md")]
#[cfg(doctest)]
pub struct GuideDerive;

#[doc = include_str!("../docs/guide/layers.md")]
#[cfg(doctest)]
pub struct GuideLayers;

#[doc = include_str!("../docs/guide/targets.md")]
#[cfg(doctest)]
pub struct GuideTargets;

#[doc = include_str!("../docs/guide/kinds.md")]
#[cfg(doctest)]
pub struct GuideKinds;

#[doc = include_str!("../docs/guide/model-api.md")]
#[cfg(doctest)]
pub struct GuideModelApi;

#[doc = include_str!("../docs/guide/file-format.md")]
#[cfg(doctest)]
pub struct GuideFileFormat;

#[doc = include_str!("../docs/guide/qlora.md")]
#[cfg(doctest)]
pub struct GuideQlora;

#[doc = include_str!("../docs/guide/cpu-ops.md")]
#[cfg(doctest)]
pub struct GuideCpuOps;

#[doc = include_str!("../docs/guide/models.md")]
#[cfg(doctest)]
pub struct GuideModels;

#[doc = include_str!("../docs/guide/architecture.md")]
#[cfg(doctest)]
pub struct GuideArchitecture;

#[doc = include_str!("../docs/guide/train.md")]
#[cfg(doctest)]
pub struct GuideTrain;

#[doc = include_str!("../docs/guide/merge.md")]
#[cfg(doctest)]
pub struct GuideMerge;

#[doc = include_str!("../docs/guide/combine.md")]
#[cfg(doctest)]
pub struct GuideCombine;
