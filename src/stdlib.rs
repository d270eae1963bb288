//! The standard library: `.obim` modules compiled into the binary and
//! imported as `std/NAME`. Diagnostics inside them name `<std/NAME.obim>`.

/// `(name, source)` of every stdlib module.
pub const MODULES: &[(&str, &str)] = &[
    ("paper", include_str!("../stdlib/paper.obim")),
    ("llama", include_str!("../stdlib/llama.obim")),
    ("mistral", include_str!("../stdlib/mistral.obim")),
    ("qwen2", include_str!("../stdlib/qwen2.obim")),
    ("stages", include_str!("../stdlib/stages.obim")),
    ("groups", include_str!("../stdlib/groups.obim")),
];

/// The source of `std/NAME`, if there is such a module.
pub fn get(import: &str) -> Option<&'static str> {
    let name = import.strip_prefix("std/")?.trim_end_matches(".obim");
    MODULES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

pub fn names() -> impl Iterator<Item = String> {
    MODULES.iter().map(|(n, _)| format!("std/{n}"))
}
