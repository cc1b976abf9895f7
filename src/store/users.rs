//! The fleet's sketch of each month's Llama end users in Redis, kept as
//! a Redis HyperLogLog in its dense encoding: the same 2^14 registers as
//! the gateway's own (`licence::hll`), six bits each. A replica's
//! registers are written as a HyperLogLog of their own and `PFMERGE`d into
//! the fleet's, which Redis merges register by register, the larger; the
//! fleet's comes back and is merged into the replica's. The gateway never
//! `PFADD`s (Redis would hash with its own function), so only the
//! encoding is shared.

use std::time::Duration;

use crate::licence::hll::REGISTERS;

/// How long the fleet's sketch of a month is kept after its last merge:
/// past the month's end, for a replica that writes it late.
pub const KEEP: Duration = Duration::from_secs(40 * 24 * 3600);

/// Redis's dense header: magic, encoding (0: dense), three unused bytes,
/// then eight bytes of cached cardinality whose top bit marks the cache
/// stale, so Redis counts afresh.
const HEADER: [u8; 16] = [
    b'H', b'Y', b'L', b'L', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80,
];
const BITS: usize = 6;
const MAX: u8 = (1 << BITS) - 1;
pub const DENSE_LEN: usize = HEADER.len() + (REGISTERS * BITS).div_ceil(8);

/// `registers` (one byte each, at most 63) as a dense Redis HyperLogLog.
pub fn encode(registers: &[u8]) -> Vec<u8> {
    let mut out = vec![0; DENSE_LEN];
    out[..HEADER.len()].copy_from_slice(&HEADER);
    let body = &mut out[HEADER.len()..];
    for (i, &value) in registers.iter().take(REGISTERS).enumerate() {
        let value = u16::from(value.min(MAX));
        let (byte, shift) = (i * BITS / 8, i * BITS % 8);
        let both = value << shift;
        body[byte] |= both as u8;
        if let Some(next) = body.get_mut(byte + 1) {
            *next |= (both >> 8) as u8;
        }
    }
    out
}

/// The registers of a dense Redis HyperLogLog; `None` for anything else
/// (a sparse one has too few users to be merged into anything anyway).
pub fn decode(hll: &[u8]) -> Option<Vec<u8>> {
    if hll.len() != DENSE_LEN || hll[..4] != HEADER[..4] || hll[4] != 0 {
        return None;
    }
    let body = &hll[HEADER.len()..];
    Some(
        (0..REGISTERS)
            .map(|i| {
                let (byte, shift) = (i * BITS / 8, i * BITS % 8);
                let low = u16::from(body[byte]);
                let high = u16::from(body.get(byte + 1).copied().unwrap_or(0));
                (((high << 8 | low) >> shift) as u8) & MAX
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_survive_the_dense_encoding() {
        let registers: Vec<u8> = (0..REGISTERS).map(|i| (i * 7 % 52) as u8).collect();
        let dense = encode(&registers);
        assert_eq!(dense.len(), 16 + 12_288);
        assert_eq!(decode(&dense).unwrap(), registers);
        assert_eq!(decode(&dense[..100]), None);
    }
}
