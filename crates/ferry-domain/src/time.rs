//! Calendar dates of UNIX times, in UTC, for people: the CLI, the console and checkpoint
//! names show times this way. No time-zone database: Ferry's hosts and operators may sit in
//! different zones, and one unambiguous zone reads the same everywhere.

use std::fmt;

/// A UTC calendar date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CivilTime {
    /// Year (e.g. 2026).
    pub year: i64,
    /// Month, 1–12.
    pub month: u32,
    /// Day of the month, 1–31.
    pub day: u32,
    /// Hour, 0–23.
    pub hour: u32,
    /// Minute, 0–59.
    pub minute: u32,
    /// Second, 0–59.
    pub second: u32,
}

impl CivilTime {
    /// The UTC date and time of `unix_s` seconds since 1970-01-01 (the `time` crate's
    /// calendar; times outside its years −9999 to 9999 are clamped to them).
    pub fn from_unix(unix_s: i64) -> Self {
        let min = time::PrimitiveDateTime::MIN.assume_utc().unix_timestamp();
        let max = time::PrimitiveDateTime::MAX.assume_utc().unix_timestamp();
        let t = time::OffsetDateTime::from_unix_timestamp(unix_s.clamp(min, max))
            .expect("clamped into the supported range");
        CivilTime {
            year: i64::from(t.year()),
            month: u32::from(u8::from(t.month())),
            day: u32::from(t.day()),
            hour: u32::from(t.hour()),
            minute: u32::from(t.minute()),
            second: u32::from(t.second()),
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS`.
impl fmt::Display for CivilTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_across_eras_leap_days_and_before_1970() {
        assert_eq!(CivilTime::from_unix(0).to_string(), "1970-01-01 00:00:00");
        assert_eq!(
            CivilTime::from_unix(1_795_982_703).to_string(),
            "2026-11-29 20:05:03"
        );
        // 2024-02-29 23:59:59, a leap day.
        assert_eq!(
            CivilTime::from_unix(1_709_251_199).to_string(),
            "2024-02-29 23:59:59"
        );
        assert_eq!(CivilTime::from_unix(-1).to_string(), "1969-12-31 23:59:59");
        assert_eq!(
            CivilTime::from_unix(951_782_400).to_string(),
            "2000-02-29 00:00:00"
        );
    }
}
