//! Human sizes (`512M`, `1G`, `64GiB`, `1048576`) as users type them on the CLI.

/// Why a size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number followed by an optional unit.
    #[error("size {0:?} is not a number with an optional unit (K, M, G, T; e.g. 512M, 8G)")]
    Malformed(String),
    /// The size does not fit in 64 bits.
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses a size in bytes. Units are binary (K = 1024), with optional `i`/`B` suffixes:
/// `8G`, `8GiB`, `8GB` all mean 8 × 2^30 bytes; a bare number is bytes.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(SizeError::Malformed(text.to_owned()));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::Overflow(text.to_owned()))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(SizeError::Malformed(text.to_owned())),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_table() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("4096", 4096),
            ("1K", 1024),
            ("512M", 512 << 20),
            ("512MiB", 512 << 20),
            ("8G", 8 << 30),
            ("8gb", 8 << 30),
            ("64GiB", 64 << 30),
            ("2T", 2 << 40),
        ];
        for (text, want) in cases {
            assert_eq!(parse_size(text).unwrap(), *want, "{text}");
        }
    }

    #[test]
    fn refuses_garbage() {
        for bad in ["", "G", "-1", "1.5G", "12X", "1 G B"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::Overflow(_))
        ));
    }
}
