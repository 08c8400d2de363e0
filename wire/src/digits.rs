//! Numbers as ASCII digits on the stack: canonical decimal and fixed-width
//! hex, for the values the relay writes per message (chain sequence and
//! digest, message ids, NATS sizes) without `format!` or an allocation.

/// `value` in canonical decimal (no leading zeros; "0" for zero).
#[derive(Debug, Clone, Copy)]
pub struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    pub fn new(mut value: u64) -> Decimal {
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        loop {
            start -= 1;
            // `value % 10` is a single digit, so the cast cannot truncate.
            digits[start] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        Decimal { digits, start }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.digits[self.start..]
    }
}

/// `value` as exactly 16 lowercase hex digits.
pub fn hex16(value: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    for (index, digit) in digits.iter_mut().enumerate() {
        let shift = 60 - 4 * index;
        *digit = HEX[((value >> shift) & 0xf) as usize];
    }
    digits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_read_as_format_writes_them() {
        for value in [0, 7, 9, 10, 99, 100, 255, 1_000_000, u64::MAX - 1, u64::MAX] {
            assert_eq!(Decimal::new(value).as_bytes(), value.to_string().as_bytes());
            assert_eq!(hex16(value).as_slice(), format!("{value:016x}").as_bytes());
        }
    }
}
