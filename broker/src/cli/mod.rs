//! Offline tools of the `holdfastd` binary: journal inspection and
//! salvage, development certificates.

pub mod gen_cert;
pub mod journal_inspect;
pub mod journal_salvage;
