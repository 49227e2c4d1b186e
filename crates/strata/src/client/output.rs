//! Table and JSON output for the client commands.

use crate::units::human_bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// One value of a table: how it reads for people (table) and for programs (JSON).
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Text(String),
    /// A size: `256Mi` in a table, a number of bytes in JSON.
    Bytes(i64),
    Number(i64),
    Bool(bool),
    /// Seconds and nanoseconds since the epoch: RFC 3339 (UTC) in both; `None` is unknown.
    Time(Option<(i64, i32)>),
}

impl From<String> for Cell {
    fn from(s: String) -> Self {
        Cell::Text(s)
    }
}

impl From<&str> for Cell {
    fn from(s: &str) -> Self {
        Cell::Text(s.to_owned())
    }
}

impl Cell {
    fn for_people(&self) -> String {
        match self {
            Cell::Text(s) => s.clone(),
            Cell::Bytes(n) => human_bytes(*n),
            Cell::Number(n) => n.to_string(),
            Cell::Bool(b) => b.to_string(),
            Cell::Time(Some((secs, nanos))) => rfc3339(*secs, *nanos),
            Cell::Time(None) => "-".into(),
        }
    }

    fn for_programs(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Cell::Text(s) => Value::String(s.clone()),
            Cell::Bytes(n) | Cell::Number(n) => Value::from(*n),
            Cell::Bool(b) => Value::Bool(*b),
            Cell::Time(Some((secs, nanos))) => Value::String(rfc3339(*secs, *nanos)),
            Cell::Time(None) => Value::Null,
        }
    }
}

/// A UTC timestamp in RFC 3339, to the second (with a fraction only when there is one).
pub fn rfc3339(secs: i64, nanos: i32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Days since 1970-01-01 to a civil date (the proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let fraction = if nanos > 0 {
        format!(".{:09}", nanos).trim_end_matches('0').to_owned()
    } else {
        String::new()
    };
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}{fraction}Z")
}

/// Rows with named columns, printable as an aligned table or a JSON array of objects.
#[derive(Debug, Default)]
pub struct Rows {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<Cell>>,
}

impl Rows {
    pub fn new(columns: &[&'static str]) -> Self {
        Rows {
            columns: columns.to_vec(),
            rows: vec![],
        }
    }

    pub fn push(&mut self, row: Vec<Cell>) {
        self.rows.push(row);
    }

    /// Prints to stdout: results go there, and only results.
    pub fn print(&self, format: Format) {
        match format {
            Format::Json => println!("{}", self.json()),
            Format::Table => print!("{}", self.table()),
        }
    }

    fn json(&self) -> String {
        let objects: Vec<serde_json::Map<String, serde_json::Value>> = self
            .rows
            .iter()
            .map(|r| {
                self.columns
                    .iter()
                    .zip(r)
                    .map(|(c, v)| (c.to_lowercase(), v.for_programs()))
                    .collect()
            })
            .collect();
        serde_json::to_string_pretty(&objects).unwrap_or_default()
    }

    fn table(&self) -> String {
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| r.iter().map(Cell::for_people).collect())
            .collect();
        let mut widths: Vec<usize> = self.columns.iter().map(|c| c.len()).collect();
        for row in &cells {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let mut s = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ");
            s.truncate(s.trim_end().len());
            s.push('\n');
            s
        };
        let mut out = line(self.columns.clone());
        for row in &cells {
            out.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_read_like_people_write() {
        let mut r = Rows::new(&["ID", "SIZE", "CREATED"]);
        r.push(vec![
            "vol-1".into(),
            Cell::Bytes(256 << 20),
            Cell::Time(Some((0, 0))),
        ]);
        r.push(vec!["v".into(), Cell::Bytes(3 << 29), Cell::Time(None)]);
        assert_eq!(
            r.table(),
            "ID     SIZE   CREATED\nvol-1  256Mi  1970-01-01T00:00:00Z\nv      1.5Gi  -\n"
        );
    }

    #[test]
    fn json_has_numbers_booleans_and_rfc3339_times() {
        let mut r = Rows::new(&["ID", "CAPACITY", "READY", "CREATED"]);
        r.push(vec![
            "v".into(),
            Cell::Bytes(268_435_456),
            Cell::Bool(true),
            Cell::Time(Some((1_795_425_695, 500_000_000))),
        ]);
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(v[0]["capacity"], 268_435_456);
        assert_eq!(v[0]["ready"], true);
        assert_eq!(v[0]["created"], "2026-11-23T09:21:35.5Z");
    }

    #[test]
    fn sizes_and_dates() {
        assert_eq!(rfc3339(951_782_400, 0), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(-1, 0), "1969-12-31T23:59:59Z");
    }
}
