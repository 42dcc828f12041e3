//! `loramux bench`: measurements that answer how to deploy adapters. This crate holds the
//! scenarios; the `loramux` binary only parses flags.

pub mod engine_bench;
pub mod synth;
