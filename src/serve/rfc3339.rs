//! Timestamps as `YYYY-MM-DDTHH:MM:SS.ffffffZ`: fixed width, the database's precision,
//! written without going through `fmt` (a page holds up to 400 of them).

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde::Serializer;

pub fn format(t: &DateTime<Utc>, buf: &mut [u8; 27]) -> Option<()> {
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    let micros = t.nanosecond() / 1000;
    // A leap second (nanosecond >= 1e9) falls back to chrono.
    if micros >= 1_000_000 {
        return None;
    }
    let mut put = |at: usize, value: u32, width: usize| {
        let mut v = value;
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, year, 4);
    put(5, t.month(), 2);
    put(8, t.day(), 2);
    put(11, t.hour(), 2);
    put(14, t.minute(), 2);
    put(17, t.second(), 2);
    put(20, micros, 6);
    for (i, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (26, b'Z'),
    ] {
        buf[i] = c;
    }
    Some(())
}

pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; 27];
    match format(t, &mut buf).and_then(|()| std::str::from_utf8(&buf).ok()) {
        Some(text) => s.serialize_str(text),
        None => s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true)),
    }
}

pub fn serialize_option<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => serialize(t, s),
        None => s.serialize_none(),
    }
}
