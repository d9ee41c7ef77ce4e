//! Pure types and rules: no IO here.

pub mod events;
pub mod ids;
pub mod profiles;
pub mod run;
pub mod time;
pub mod workspace;
