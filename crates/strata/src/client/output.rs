//! Table and JSON output for the client commands.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Rows with named columns, printable as an aligned table or a JSON array of objects.
#[derive(Debug, Default, Serialize)]
pub struct Rows {
    #[serde(skip)]
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Rows {
    pub fn new(columns: &[&'static str]) -> Self {
        Rows {
            columns: columns.to_vec(),
            rows: vec![],
        }
    }

    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    pub fn print(&self, format: Format) {
        match format {
            Format::Json => {
                let objects: Vec<serde_json::Map<String, serde_json::Value>> = self
                    .rows
                    .iter()
                    .map(|r| {
                        self.columns
                            .iter()
                            .zip(r)
                            .map(|(c, v)| (c.to_lowercase(), serde_json::Value::String(v.clone())))
                            .collect()
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&objects).unwrap_or_default()
                );
            }
            Format::Table => print!("{}", self.table()),
        }
    }

    fn table(&self) -> String {
        let mut widths: Vec<usize> = self.columns.iter().map(|c| c.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
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
        for row in &self.rows {
            out.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let mut r = Rows::new(&["ID", "SIZE"]);
        r.push(vec!["vol-1".into(), "1".into()]);
        r.push(vec!["v".into(), "1024".into()]);
        assert_eq!(r.table(), "ID     SIZE\nvol-1  1\nv      1024\n");
    }
}
