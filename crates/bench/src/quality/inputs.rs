//! What `bench quality` reads before it loads a model: the task adapters
//! (`<dir>/<task>/` with a PEFT adapter and `heldout.jsonl`), their held-out items, and the
//! rank-sweep adapters (`<sweep>/<task>-r<rank>/`). Every error names the file, and the
//! line for a held-out item, so a bad input fails before any measuring starts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::BenchError;

/// One held-out item: the user message and the exact answer expected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub prompt: String,
    pub answer: String,
}

/// A task: its adapter folder and held-out set.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    pub name: String,
    /// The PEFT adapter folder.
    pub dir: PathBuf,
    /// `<dir>/heldout.jsonl`.
    pub heldout: PathBuf,
}

/// One adapter of a rank sweep: a task trained again at another rank.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepAdapter {
    pub task: String,
    pub rank: usize,
    pub dir: PathBuf,
}

/// The file of the held-out items in a task folder.
pub const HELDOUT_FILE: &str = "heldout.jsonl";
/// The weights file a PEFT adapter folder holds once trained.
const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Parses held-out JSONL text (`path` names it in errors): one object per non-blank line
/// with string fields `prompt` and `answer` (others are ignored); at least one item.
pub fn parse_heldout(text: &str, path: &Path) -> Result<Vec<Item>, BenchError> {
    let at = |line: usize, what: String| BenchError::Invalid(format!("{}:{line}: {what}", path.display()));
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| at(i + 1, format!("not JSON ({e}); held-out files are JSONL")))?;
        let field = |name: &str| match value.get(name) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(at(i + 1, format!("\"{name}\" must be a string"))),
            None => Err(at(i + 1, format!("no \"{name}\" field (each line needs \"prompt\" and \"answer\")"))),
        };
        if !value.is_object() {
            return Err(at(i + 1, "not a JSON object with \"prompt\" and \"answer\"".into()));
        }
        items.push(Item { prompt: field("prompt")?, answer: field("answer")? });
    }
    if items.is_empty() {
        return Err(BenchError::Invalid(format!("{}: no held-out items", path.display())));
    }
    Ok(items)
}

/// Reads a held-out file whole (every line is checked) and keeps its first `limit` items.
pub fn read_heldout(path: &Path, limit: Option<usize>) -> Result<Vec<Item>, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::Io { path: path.to_path_buf(), source: e })?;
    let mut items = parse_heldout(&text, path)?;
    items.truncate(limit.unwrap_or(usize::MAX));
    Ok(items)
}

/// Subfolders of `dir`, sorted by name.
fn subfolders(dir: &Path) -> Result<Vec<(String, PathBuf)>, BenchError> {
    let entries = std::fs::read_dir(dir).map_err(|e| BenchError::Io { path: dir.to_path_buf(), source: e })?;
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((e.file_name().to_str()?.to_string(), e.path())))
        .collect();
    out.sort();
    Ok(out)
}

/// The tasks in `dir` (subfolders with `adapter_config.json` and `heldout.jsonl`), only those
/// named in `only` when it is not empty. An error when there are none or a name is unknown.
pub fn find_tasks(dir: &Path, only: &[String]) -> Result<Vec<Task>, BenchError> {
    if !dir.is_dir() {
        return Err(BenchError::Invalid(format!(
            "{}: no such folder (--adapters wants a folder of task adapters: <task>/adapter_config.json and <task>/{HELDOUT_FILE})",
            dir.display()
        )));
    }
    let tasks: Vec<Task> = subfolders(dir)?
        .into_iter()
        .filter(|(_, d)| d.join("adapter_config.json").is_file() && d.join(HELDOUT_FILE).is_file())
        .map(|(name, d)| Task { name, heldout: d.join(HELDOUT_FILE), dir: d })
        .collect();
    if tasks.is_empty() {
        return Err(BenchError::Invalid(format!(
            "{}: no task adapters in it (a task is a subfolder with adapter_config.json and {HELDOUT_FILE})",
            dir.display()
        )));
    }
    let names: Vec<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
    if let Some(unknown) = only.iter().find(|o| !names.contains(&o.as_str())) {
        return Err(BenchError::Invalid(format!("--only: no task '{unknown}' in {} (tasks: {})", dir.display(), names.join(", "))));
    }
    Ok(tasks.into_iter().filter(|t| only.is_empty() || only.contains(&t.name)).collect())
}

/// The sweep adapters in `dir` (`<task>-r<rank>` folders) for the given tasks, sorted by task
/// and rank, with a note for each folder left out (no weights yet, unknown task, odd name).
pub fn find_sweep(dir: &Path, tasks: &[Task]) -> Result<(Vec<SweepAdapter>, Vec<String>), BenchError> {
    let (mut found, mut notes) = (Vec::new(), Vec::new());
    for (name, d) in subfolders(dir)? {
        let parsed = name.rsplit_once("-r").and_then(|(task, r)| Some((task.to_string(), r.parse::<usize>().ok()?)));
        let Some((task, rank)) = parsed.filter(|(_, r)| *r > 0) else {
            notes.push(format!("sweep: {} is not named <task>-r<rank>; skipped", d.display()));
            continue;
        };
        if !tasks.iter().any(|t| t.name == task) {
            notes.push(format!("sweep: {name} skipped: task '{task}' is not measured in this run"));
        } else if !d.join(WEIGHTS_FILE).is_file() {
            notes.push(format!("sweep: {name} skipped: no {WEIGHTS_FILE} yet (still training?)"));
        } else {
            found.push(SweepAdapter { task, rank, dir: d });
        }
    }
    found.sort_by(|a, b| (&a.task, a.rank).cmp(&(&b.task, b.rank)));
    Ok((found, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse_heldout(text, Path::new("t/heldout.jsonl")).unwrap_err().to_string()
    }

    #[test]
    fn parses_items_skipping_blank_lines_and_extra_fields() {
        let text = "{\"prompt\": \"a\", \"answer\": \"1\"}\n\n{\"prompt\": \"b\", \"answer\": \"2\", \"id\": 7}\n";
        let items = parse_heldout(text, Path::new("x")).unwrap();
        assert_eq!(items, vec![Item { prompt: "a".into(), answer: "1".into() }, Item { prompt: "b".into(), answer: "2".into() }]);
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let ok = "{\"prompt\": \"a\", \"answer\": \"1\"}\n";
        assert!(err(&format!("{ok}not json\n")).starts_with("t/heldout.jsonl:2: not JSON"), "{}", err(&format!("{ok}not json")));
        assert!(err(&format!("{ok}\n{{\"prompt\": \"b\"}}")).starts_with("t/heldout.jsonl:3: no \"answer\" field"));
        assert!(err("{\"answer\": \"b\"}").starts_with("t/heldout.jsonl:1: no \"prompt\" field"));
        assert!(err("{\"prompt\": 3, \"answer\": \"b\"}").starts_with("t/heldout.jsonl:1: \"prompt\" must be a string"));
        assert!(err("[1, 2]").starts_with("t/heldout.jsonl:1: not a JSON object"));
        assert_eq!(err("\n \n"), "t/heldout.jsonl: no held-out items");
        // A whole JSON array is not JSONL.
        assert!(err("[\n{\"prompt\": \"a\", \"answer\": \"1\"}\n]").starts_with("t/heldout.jsonl:1: not JSON"));
    }

    #[test]
    fn read_keeps_the_first_items_and_checks_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(HELDOUT_FILE);
        std::fs::write(&p, "{\"prompt\": \"a\", \"answer\": \"1\"}\n{\"prompt\": \"b\", \"answer\": \"2\"}\n").unwrap();
        assert_eq!(read_heldout(&p, Some(1)).unwrap().len(), 1);
        assert_eq!(read_heldout(&p, None).unwrap().len(), 2);
        std::fs::write(&p, "{\"prompt\": \"a\", \"answer\": \"1\"}\n{\"prompt\": \"b\"}\n").unwrap();
        assert!(read_heldout(&p, Some(1)).is_err(), "a bad line after the limit is still an error");
        assert!(read_heldout(&dir.path().join("none.jsonl"), None).unwrap_err().to_string().contains("none.jsonl"));
    }

    fn task_dir(root: &Path, name: &str, weights: bool) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("adapter_config.json"), "{}").unwrap();
        std::fs::write(d.join(HELDOUT_FILE), "{\"prompt\": \"a\", \"answer\": \"1\"}\n").unwrap();
        if weights {
            std::fs::write(d.join(WEIGHTS_FILE), "").unwrap();
        }
    }

    #[test]
    fn finds_tasks_and_rejects_folders_without_any() {
        let dir = tempfile::tempdir().unwrap();
        let e = find_tasks(dir.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("no task adapters"), "{e}");
        assert!(find_tasks(&dir.path().join("missing"), &[]).unwrap_err().to_string().contains("no such folder"));
        task_dir(dir.path(), "sql", true);
        task_dir(dir.path(), "date", true);
        std::fs::create_dir_all(dir.path().join("plain")).unwrap();
        let names: Vec<String> = find_tasks(dir.path(), &[]).unwrap().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["date", "sql"]);
        assert_eq!(find_tasks(dir.path(), &["sql".into()]).unwrap().len(), 1);
        let e = find_tasks(dir.path(), &["nope".into()]).unwrap_err().to_string();
        assert!(e.contains("no task 'nope'") && e.contains("date, sql"), "{e}");
    }

    #[test]
    fn sweep_keeps_trained_adapters_of_measured_tasks_by_rank() {
        let (tasks_dir, sweep) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        task_dir(tasks_dir.path(), "sql", true);
        let tasks = find_tasks(tasks_dir.path(), &[]).unwrap();
        for (name, weights) in [("sql-r16", true), ("sql-r2", true), ("sql-r64", false), ("date-r4", true), ("odd", true)] {
            task_dir(sweep.path(), name, weights);
        }
        let (found, notes) = find_sweep(sweep.path(), &tasks).unwrap();
        assert_eq!(found.iter().map(|a| a.rank).collect::<Vec<_>>(), [2, 16]);
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("sql-r64") && n.contains("still training")), "{notes:?}");
    }
}
