//! Kubernetes quantities, as far as MLTask needs them: reading sizes and
//! GPU counts, and writing a size in the canonical form the API server
//! stores (`10240Mi` comes back as `10Gi`), so the host's diff of desired
//! against observed sees no change when there is none.
//!
//! Follows `k8s.io/apimachinery/pkg/api/resource`: `<number><suffix>` with
//! binary suffixes (`Ki` … `Ei`), decimal ones (`m`, none, `k` … `E`) or a
//! decimal exponent (`e3`); a quantity keeps its kind of suffix when
//! canonicalized, except binary amounts below 1024, written as plain
//! numbers. Only non-negative quantities are accepted: none of ours may be
//! negative.

/// The largest amount a quantity may hold (2^63 - 1).
const MAX: u128 = i64::MAX as u128;

/// The kind of suffix a quantity was written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `Ki`, `Mi`, … (powers of 1024).
    BinarySi,
    /// `m`, none, `k`, `M`, … (powers of 1000).
    DecimalSi,
    /// `e<n>` / `E<n>` (powers of ten).
    DecimalExponent,
}

/// A parsed quantity: `digits × 10^exp10 × 1024^exp1024`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    digits: u128,
    exp10: i32,
    exp1024: u32,
    format: Format,
}

/// The longest quantity text we read; real ones are a handful of characters.
const MAX_LEN: usize = 64;

/// Parses `text`, or `None` when it is not a non-negative quantity.
pub fn parse(text: &str) -> Option<Quantity> {
    if text.len() > MAX_LEN {
        return None;
    }
    let text = text.strip_prefix('+').unwrap_or(text);
    let number_len = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_len);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return None;
    }
    let mut digits: u128 = 0;
    for b in whole.bytes().chain(fraction.bytes()) {
        digits = digits.checked_mul(10)?.checked_add(u128::from(b - b'0'))?;
    }
    let mut exp10 = -i32::try_from(fraction.len()).ok()?;
    let (format, exp1024) = match suffix {
        "Ki" => (Format::BinarySi, 1),
        "Mi" => (Format::BinarySi, 2),
        "Gi" => (Format::BinarySi, 3),
        "Ti" => (Format::BinarySi, 4),
        "Pi" => (Format::BinarySi, 5),
        "Ei" => (Format::BinarySi, 6),
        _ => {
            let (format, shift) = match suffix {
                "m" => (Format::DecimalSi, -3),
                "" => (Format::DecimalSi, 0),
                "k" => (Format::DecimalSi, 3),
                "M" => (Format::DecimalSi, 6),
                "G" => (Format::DecimalSi, 9),
                "T" => (Format::DecimalSi, 12),
                "P" => (Format::DecimalSi, 15),
                "E" => (Format::DecimalSi, 18),
                _ => {
                    let exponent = suffix.strip_prefix(['e', 'E'])?;
                    let unsigned = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
                    if unsigned.is_empty()
                        || unsigned.len() > 3
                        || !unsigned.bytes().all(|b| b.is_ascii_digit())
                    {
                        return None;
                    }
                    (Format::DecimalExponent, exponent.parse::<i32>().ok()?)
                }
            };
            exp10 += shift;
            (format, 0)
        }
    };
    Some(Quantity {
        digits,
        exp10,
        exp1024,
        format,
    })
}

impl Quantity {
    /// `digits × 1024^exp1024` and the power of ten still to apply.
    fn scaled(&self) -> Option<(u128, i32)> {
        let mut n = self.digits;
        for _ in 0..self.exp1024 {
            n = n.checked_mul(1024)?;
        }
        Some((n, self.exp10))
    }

    /// The amount rounded down to a whole number, saturating at 2^63 - 1
    /// (as Kubernetes caps quantities).
    pub fn floor(&self) -> u128 {
        let Some((mut n, exp10)) = self.scaled() else {
            return MAX;
        };
        if exp10 >= 0 {
            for _ in 0..exp10 {
                match n.checked_mul(10) {
                    Some(m) if m <= MAX => n = m,
                    _ => return if n == 0 { 0 } else { MAX },
                }
            }
        } else {
            for _ in 0..exp10.unsigned_abs() {
                n /= 10;
            }
        }
        n.min(MAX)
    }

    /// The amount when it is a whole number no larger than 2^63 - 1.
    pub fn whole(&self) -> Option<u128> {
        let (mut n, exp10) = self.scaled()?;
        if exp10 >= 0 {
            for _ in 0..exp10 {
                n = n.checked_mul(10)?;
            }
        } else {
            for _ in 0..exp10.unsigned_abs() {
                if !n.is_multiple_of(10) {
                    return None;
                }
                n /= 10;
            }
        }
        (n <= MAX).then_some(n)
    }

    /// The canonical text of a whole-number quantity (`None` when it has a
    /// fraction or is too large), as the API server would write it back.
    pub fn canonical_whole(&self) -> Option<String> {
        let n = self.whole()?;
        Some(match self.format {
            Format::BinarySi if n >= 1024 => base_1024(n),
            Format::BinarySi | Format::DecimalSi => base_1000(n, false),
            Format::DecimalExponent => base_1000(n, true),
        })
    }
}

/// `n` with the largest binary suffix that keeps it whole (`1536Mi`, `10Gi`).
fn base_1024(mut n: u128) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut i = 0;
    while n != 0 && n.is_multiple_of(1024) && i + 1 < SUFFIXES.len() {
        n /= 1024;
        i += 1;
    }
    format!("{n}{}", SUFFIXES[i])
}

/// `n` with the largest power of 1000 that keeps it whole, as a decimal SI
/// suffix (`1500M`) or an exponent (`15e8` is written `1500e6`).
fn base_1000(mut n: u128, exponent_form: bool) -> String {
    const SUFFIXES: [&str; 7] = ["", "k", "M", "G", "T", "P", "E"];
    let mut i = 0;
    while n != 0 && n.is_multiple_of(1000) && i + 1 < SUFFIXES.len() {
        n /= 1000;
        i += 1;
    }
    if exponent_form && i > 0 {
        format!("{n}e{}", 3 * i)
    } else {
        format!("{n}{}", SUFFIXES[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(text: &str) -> Option<String> {
        parse(text)?.canonical_whole()
    }

    #[test]
    fn sizes_come_back_as_the_api_server_writes_them() {
        assert_eq!(canonical("10Gi").as_deref(), Some("10Gi"));
        assert_eq!(canonical("10240Mi").as_deref(), Some("10Gi"));
        assert_eq!(canonical("1.5Gi").as_deref(), Some("1536Mi"));
        assert_eq!(canonical("0.5Ki").as_deref(), Some("512"));
        assert_eq!(canonical("1500M").as_deref(), Some("1500M"));
        assert_eq!(canonical("1.5G").as_deref(), Some("1500M"));
        assert_eq!(canonical("10000M").as_deref(), Some("10G"));
        assert_eq!(canonical("1000").as_deref(), Some("1k"));
        assert_eq!(canonical("123").as_deref(), Some("123"));
        assert_eq!(canonical("1e3").as_deref(), Some("1e3"));
        assert_eq!(canonical("15e8").as_deref(), Some("1500e6"));
        assert_eq!(canonical("+2Gi").as_deref(), Some("2Gi"));
    }

    #[test]
    fn fractions_and_overflow_are_not_whole() {
        assert_eq!(canonical("1.5"), None);
        assert_eq!(canonical("1500m"), None);
        assert_eq!(canonical("2000m").as_deref(), Some("2"));
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in [
            "", "Gi", "-1Gi", "1.2.3", "10 Gi", "10gi", "1e", "1e1234", "1x", ".", "1Gi ",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(parse("99999999999999999999999999999999999999999999"), None);
        assert_eq!(canonical("16Ei"), None, "more than 2^63 - 1");
    }

    #[test]
    fn floor_counts_gpus() {
        assert_eq!(parse("4").unwrap().floor(), 4);
        assert_eq!(parse("0").unwrap().floor(), 0);
        assert_eq!(parse("2500m").unwrap().floor(), 2);
        assert_eq!(parse("1k").unwrap().floor(), 1000);
        assert_eq!(parse("1e30").unwrap().floor(), MAX);
    }
}
