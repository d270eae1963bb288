//! The integration tests, as one binary (one link of candle and tokenizers
//! instead of one per file). Each module tests one surface; fixtures live
//! beside this folder (`tests/recipes`, `tests/goldens`, `tests/archs`).

mod cli;
mod common;
mod docs;
mod forward;
mod hub;
mod lora;
mod mergekit;
mod mutations;
mod obd;
mod output;
mod parts;
mod recipes;
mod regmean;
mod run;
mod run_errors;
mod select;
mod vocab;
