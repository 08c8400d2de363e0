//! The planner guard (`[guard]`): rolls back planner scaling decisions that
//! keep the fleet overloaded. See `core.rs` for the rules.

pub mod core;
