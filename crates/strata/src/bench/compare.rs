//! `strata bench compare`: one scenario against two endpoints, round by round in turn, so
//! noise on the machine falls on both alike; each figure's median side by side with the
//! ratio B/A.

use clap::Parser;
use serde::Serialize;

use super::{BenchCommand, Outcome};
use crate::client::connect;
use crate::client::output::Format;
use crate::endpoint::Endpoint;

/// A scenario's command line, as `strata bench SCENARIO ...` takes it.
#[derive(Parser)]
#[command(no_binary_name = true)]
struct ScenarioLine {
    #[command(subcommand)]
    scenario: BenchCommand,
}

#[derive(Serialize)]
struct Row {
    figure: String,
    a: Option<f64>,
    b: Option<f64>,
    /// B / A.
    ratio: Option<f64>,
}

#[derive(Serialize)]
struct Comparison {
    scenario: String,
    a: String,
    b: String,
    rounds: usize,
    figures: Vec<Row>,
    /// Why the scenario did not run against an endpoint, if it did not.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    skipped: Vec<String>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn parse(scenario: &str, args: &[String], endpoint: &Endpoint) -> Result<BenchCommand, String> {
    if scenario == "compare" {
        return Err("compare runs scenarios; it is not one itself".into());
    }
    let line = std::iter::once(scenario.to_owned())
        .chain(args.iter().cloned())
        .chain(["--endpoint".to_owned(), endpoint.to_string()]);
    ScenarioLine::try_parse_from(line)
        .map(|l| l.scenario)
        .map_err(|e| format!("bench {scenario}: {}", e.render().to_string().trim()))
}

pub async fn compare(
    scenario: &str,
    endpoints: &[Endpoint],
    rounds: usize,
    args: &[String],
    format: Format,
) -> Result<(), String> {
    let [a, b] = endpoints else {
        return Err(format!(
            "compare takes two endpoints (--endpoint A --endpoint B), not {}",
            endpoints.len()
        ));
    };
    // Options are checked once, before anything runs against either driver.
    for e in [a, b] {
        parse(scenario, args, e)?;
    }
    // Figures in the order the scenario reports them; one list of values per endpoint.
    let mut names: Vec<String> = vec![];
    let mut values: [Vec<(String, f64)>; 2] = [vec![], vec![]];
    let mut skipped = vec![];
    for round in 0..rounds.max(1) {
        for (side, endpoint) in [a, b].into_iter().enumerate() {
            if format == Format::Table {
                eprintln!("round {}: {scenario} against {endpoint}", round + 1);
            }
            let csi = connect(endpoint).await?;
            let outcome = parse(scenario, args, endpoint)?
                .measure(csi, Format::Json)
                .await
                .map_err(|e| format!("{endpoint}: {e}"))?;
            if let Outcome::Skipped(why) = &outcome {
                let line = format!("{endpoint}: {why}");
                if !skipped.contains(&line) {
                    skipped.push(line);
                }
            }
            outcome.result().map_err(|e| format!("{endpoint}: {e}"))?;
            for (name, value) in outcome.figures() {
                if !names.contains(name) {
                    names.push(name.clone());
                }
                values[side].push((name.clone(), *value));
            }
        }
    }
    let of = |side: usize, name: &str| {
        median(
            values[side]
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| *v)
                .collect(),
        )
    };
    let figures: Vec<Row> = names
        .iter()
        .map(|name| {
            let (va, vb) = (of(0, name), of(1, name));
            Row {
                figure: name.clone(),
                a: va,
                b: vb,
                ratio: va.zip(vb).filter(|(x, _)| *x != 0.0).map(|(x, y)| y / x),
            }
        })
        .collect();
    let report = Comparison {
        scenario: scenario.to_owned(),
        a: a.to_string(),
        b: b.to_string(),
        rounds: rounds.max(1),
        figures,
        skipped,
    };
    print(&report, format);
    Ok(())
}

fn print(report: &Comparison, format: Format) {
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        ),
        Format::Table => {
            println!(
                "{}, medians of {} rounds\nA: {}\nB: {}",
                report.scenario, report.rounds, report.a, report.b
            );
            println!("{:<36} {:>12} {:>12} {:>8}", "FIGURE", "A", "B", "B/A");
            let cell = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.3}"));
            for r in &report.figures {
                println!(
                    "{:<36} {:>12} {:>12} {:>8}",
                    r.figure,
                    cell(r.a),
                    cell(r.b),
                    r.ratio.map_or("-".to_owned(), |v| format!("{v:.2}"))
                );
            }
            for why in &report.skipped {
                println!("skipped on {why}");
            }
        }
    }
}
