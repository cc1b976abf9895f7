//! The OpenAI wire format: the canonical format inside the gateway and the
//! one clients speak. Providers translate to and from these types.

mod request;
mod response;
pub mod scan;
mod text;
mod usage;

pub use request::*;
pub use response::*;
pub use usage::*;
