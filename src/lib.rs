//! vm-workflow: an event-sourced workflow server with a GraphQL API.

pub mod bus;
pub mod cli;
pub mod config;
pub mod domain;
pub mod error;
pub mod graphql;
pub mod http;
pub mod runner;
pub mod runtime;
pub mod service;
pub mod startup;
pub mod store;
pub mod sync;
pub mod telemetry;
