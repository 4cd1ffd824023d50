//! The machine a run happened on, for the report header.

/// CPU count and model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Logical CPUs this process may use (what `nproc` prints).
    pub nproc: usize,
    /// `model name` from /proc/cpuinfo, or "unknown".
    pub cpu_model: String,
    /// 1/5/15-minute load averages when the run started (other work on the
    /// machine skews every number), or "unknown".
    pub load_average: String,
}

impl Machine {
    /// Reads the current machine; missing facts become "unknown"/0, never an error.
    pub fn current() -> Self {
        let nproc = std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(0);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| cpu_model(&text))
            .unwrap_or_else(|| "unknown".into());
        let load_average = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .map(|text| {
                text.split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into());
        Machine {
            nproc,
            cpu_model,
            load_average,
        }
    }
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_first_model_name() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n\
                    processor\t: 1\nmodel name\t: other\n";
        assert_eq!(
            cpu_model(text).as_deref(),
            Some("Intel(R) Xeon(R) CPU @ 2.20GHz")
        );
        assert_eq!(cpu_model("processor: 0\n"), None);
    }

    #[test]
    fn current_machine_has_cpus() {
        let m = Machine::current();
        assert!(m.nproc >= 1);
        assert_eq!(m.load_average.split(' ').count(), 3, "{}", m.load_average);
    }
}
