//! Random ids for requests and responses. They need to be unique, not
//! secret: 128 bits from a fast thread-local generator, as 32 hex digits
//! (the shape of a simple UUID), with no system call per id.

pub fn random() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}
