//! How many compute threads to run: what the container may use, not what the node has.
//!
//! A pod with `limits.cpu: 1` on a 64-core node sees 64 cores; 64 threads there are throttled
//! by the CFS quota and slower than one. The budget is the smallest of the process's CPU
//! affinity (`Cpus_allowed_list` of `/proc/self/status`) and the CPU quota of its cgroup and
//! every ancestor up to the cgroup mount (v2 `cpu.max`; v1 `cpu.cfs_quota_us` /
//! `cpu.cfs_period_us`), rounded down, at least 1. `--inference-threads` overrides it. The
//! parsing is pure (text in, numbers out); only [`ComputeThreads::detect`] reads files.

use std::path::{Path, PathBuf};

/// The thread count and why, for `/info` and the startup log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComputeThreads {
    pub count: usize,
    pub reason: String,
}

/// A CFS bandwidth limit: `quota` microseconds of CPU time per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub quota_us: u64,
    pub period_us: u64,
}

impl Quota {
    /// Whole CPUs the quota pays for, at least one.
    pub fn cpus(self) -> usize {
        usize::try_from(self.quota_us / self.period_us.max(1))
            .unwrap_or(usize::MAX)
            .max(1)
    }
}

/// A quota and the file it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLimit {
    pub quota: Quota,
    pub source: String,
}

/// cgroup v2 `cpu.max`: `"<quota> <period>"`, or `"max <period>"` for no limit.
pub fn parse_cpu_max(text: &str) -> Option<Quota> {
    let mut fields = text.split_whitespace();
    let quota = fields.next()?.parse().ok()?;
    let period = fields.next().map_or(Some(100_000), |p| p.parse().ok())?;
    (period > 0).then_some(Quota {
        quota_us: quota,
        period_us: period,
    })
}

/// cgroup v1 `cpu.cfs_quota_us` (`-1` for no limit) and `cpu.cfs_period_us`.
pub fn parse_cfs(quota: &str, period: &str) -> Option<Quota> {
    let quota: i64 = quota.trim().parse().ok()?;
    let period: u64 = period.trim().parse().ok()?;
    (quota > 0 && period > 0).then_some(Quota {
        quota_us: quota.unsigned_abs(),
        period_us: period,
    })
}

/// A CPU list as the kernel prints it (`0-3,8,10-11`): how many CPUs it names.
pub fn parse_cpu_list(list: &str) -> Option<usize> {
    let mut count = 0;
    for range in list.trim().split(',').filter(|r| !r.is_empty()) {
        let (first, last) = match range.split_once('-') {
            Some((first, last)) => (first.parse::<usize>().ok()?, last.parse::<usize>().ok()?),
            None => {
                let cpu = range.parse::<usize>().ok()?;
                (cpu, cpu)
            }
        };
        count += last.checked_sub(first)? + 1;
    }
    (count > 0).then_some(count)
}

/// The CPUs of the process's affinity mask, from `/proc/self/status`.
pub fn affinity_from_status(status: &str) -> Option<usize> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .and_then(parse_cpu_list)
}

/// Which cgroup hierarchy a mount belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hierarchy {
    V1Cpu,
    V2,
}

/// A cgroup filesystem mount that can hold a CPU quota (from `/proc/self/mountinfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    hierarchy: Hierarchy,
    /// The cgroup shown at the mount point (a container sees its own cgroup as `/`'s stand-in).
    root: String,
    mount_point: PathBuf,
}

/// cgroup mounts of mountinfo lines `id parent dev root mount-point options [optional...] -
/// fstype source super-options`: cgroup2 ones and v1 ones with the `cpu` controller.
fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let mount: Vec<&str> = mount.split_whitespace().collect();
            let fs: Vec<&str> = fs.split_whitespace().collect();
            let (root, mount_point) = (*mount.get(3)?, *mount.get(4)?);
            let hierarchy = match *fs.first()? {
                "cgroup2" => Hierarchy::V2,
                "cgroup" if fs.get(2)?.split(',').any(|option| option == "cpu") => Hierarchy::V1Cpu,
                _ => return None,
            };
            Some(CgroupMount {
                hierarchy,
                root: root.to_owned(),
                mount_point: PathBuf::from(mount_point),
            })
        })
        .collect()
}

/// The process's cgroup path in `hierarchy`, from `/proc/self/cgroup` (`0::/path` for v2,
/// `<id>:cpu,cpuacct:/path` for v1).
fn cgroup_path(self_cgroup: &str, hierarchy: Hierarchy) -> Option<&str> {
    self_cgroup.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (id, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let matches = match hierarchy {
            Hierarchy::V2 => id == "0" && controllers.is_empty(),
            Hierarchy::V1Cpu => controllers.split(',').any(|c| c == "cpu"),
        };
        matches.then_some(path)
    })
}

/// The tightest CPU quota on the process's cgroups and their ancestors, reading files through
/// `read` (a path to its content, `None` when absent). Limits may sit on a parent (the pod's
/// cgroup) as well as on the container's own.
pub fn cgroup_limit(
    self_cgroup: &str,
    mountinfo: &str,
    read: impl Fn(&Path) -> Option<String>,
) -> Option<CgroupLimit> {
    let mut tightest: Option<CgroupLimit> = None;
    for mount in cgroup_mounts(mountinfo) {
        let Some(path) = cgroup_path(self_cgroup, mount.hierarchy) else {
            continue;
        };
        // Inside a container the mount's root is the container's cgroup; outside it is `/`.
        let Some(relative) = path.strip_prefix(mount.root.trim_end_matches('/')) else {
            continue;
        };
        let mut dir = mount.mount_point.join(relative.trim_start_matches('/'));
        loop {
            let found = match mount.hierarchy {
                Hierarchy::V2 => read(&dir.join("cpu.max"))
                    .and_then(|text| parse_cpu_max(&text))
                    .map(|quota| (quota, format!("{}", dir.join("cpu.max").display()))),
                Hierarchy::V1Cpu => {
                    let quota = read(&dir.join("cpu.cfs_quota_us"));
                    let period = read(&dir.join("cpu.cfs_period_us"));
                    quota
                        .zip(period)
                        .and_then(|(quota, period)| parse_cfs(&quota, &period))
                        .map(|quota| {
                            let source = dir.join("cpu.cfs_quota_us");
                            (quota, format!("{} (cgroup v1)", source.display()))
                        })
                }
            };
            if let Some((quota, source)) = found
                && tightest
                    .as_ref()
                    .is_none_or(|t| quota.cpus() < t.quota.cpus())
            {
                tightest = Some(CgroupLimit { quota, source });
            }
            if dir == mount.mount_point || !dir.pop() || !dir.starts_with(&mount.mount_point) {
                break;
            }
        }
    }
    tightest
}

/// The decision, from what was found: an explicit count wins; otherwise the smaller of the
/// affinity and the quota; `fallback` (the core count) when neither is known.
pub fn decide(
    requested: Option<usize>,
    affinity: Option<usize>,
    limit: Option<&CgroupLimit>,
    fallback: usize,
) -> ComputeThreads {
    if let Some(count) = requested {
        return ComputeThreads {
            count,
            reason: "--inference-threads".to_owned(),
        };
    }
    let by_affinity = |cpus| ComputeThreads {
        count: cpus,
        reason: "CPU affinity (Cpus_allowed_list)".to_owned(),
    };
    match (affinity, limit) {
        (Some(cpus), Some(limit)) if cpus < limit.quota.cpus() => by_affinity(cpus),
        (_, Some(limit)) => ComputeThreads {
            count: limit.quota.cpus(),
            reason: format!(
                "CPU limit {}/{} us per period ({})",
                limit.quota.quota_us, limit.quota.period_us, limit.source
            ),
        },
        (Some(cpus), None) => by_affinity(cpus),
        (None, None) => ComputeThreads {
            count: fallback.max(1),
            reason: "available parallelism".to_owned(),
        },
    }
}

impl ComputeThreads {
    /// Reads this process's affinity and cgroup limits and decides.
    pub fn detect(requested: Option<usize>) -> Self {
        let read = |path: &Path| std::fs::read_to_string(path).ok();
        let affinity = read(Path::new("/proc/self/status")).and_then(|s| affinity_from_status(&s));
        let limit = match (
            read(Path::new("/proc/self/cgroup")),
            read(Path::new("/proc/self/mountinfo")),
        ) {
            (Some(cgroup), Some(mountinfo)) => cgroup_limit(&cgroup, &mountinfo, read),
            _ => None,
        };
        let fallback = std::thread::available_parallelism().map_or(1, |n| n.get());
        decide(requested, affinity, limit.as_ref(), fallback)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn cpu_max_of_cgroup_v2() {
        let quota = |quota_us, period_us| {
            Some(Quota {
                quota_us,
                period_us,
            })
        };
        assert_eq!(parse_cpu_max("100000 100000\n"), quota(100_000, 100_000));
        assert_eq!(parse_cpu_max("150000 100000"), quota(150_000, 100_000));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max(""), None);
        assert_eq!(parse_cpu_max("50000 0"), None);
        assert_eq!(quota(150_000, 100_000).unwrap().cpus(), 1, "rounded down");
        assert_eq!(quota(50_000, 100_000).unwrap().cpus(), 1, "at least one");
        assert_eq!(quota(400_000, 100_000).unwrap().cpus(), 4);
    }

    #[test]
    fn cfs_quota_of_cgroup_v1() {
        assert_eq!(
            parse_cfs("200000\n", "100000\n"),
            Some(Quota {
                quota_us: 200_000,
                period_us: 100_000
            })
        );
        assert_eq!(parse_cfs("-1\n", "100000\n"), None, "no limit");
        assert_eq!(parse_cfs("garbage", "100000"), None);
    }

    #[test]
    fn cpu_lists_and_affinity() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n"), Some(7));
        assert_eq!(parse_cpu_list("5"), Some(1));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        let status = "Name:\tqmodel-server\nCpus_allowed:\tff\nCpus_allowed_list:\t0-1\n";
        assert_eq!(affinity_from_status(status), Some(2));
        assert_eq!(affinity_from_status("Name: x\n"), None);
    }

    /// Files of a fake /sys/fs/cgroup tree.
    fn files(entries: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let map: HashMap<PathBuf, String> = entries
            .iter()
            .map(|(path, text)| (PathBuf::from(path), (*text).to_owned()))
            .collect();
        move |path| map.get(path).cloned()
    }

    #[test]
    fn container_on_cgroup_v1_reads_its_own_quota_under_the_mount() {
        // containerd without a cgroup namespace: the container's cgroup is bind-mounted at the
        // mount point; /proc/self/cgroup shows the host path.
        let mountinfo = "\
1 0 0:1 / / ro,relatime - overlay overlay rw
30 1 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
31 30 0:27 /k8s.io/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid master:9 - cgroup cgroup rw,cpu,cpuacct
32 30 0:28 /k8s.io/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory
";
        let cgroup =
            "5:memory:/k8s.io/abc\n4:cpu,cpuacct:/k8s.io/abc\n1:name=systemd:/k8s.io/abc\n";
        let limit = cgroup_limit(
            cgroup,
            mountinfo,
            files(&[
                ("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "100000\n"),
                ("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n"),
            ]),
        )
        .unwrap();
        assert_eq!(limit.quota.cpus(), 1);
        assert!(
            limit.source.contains("cpu,cpuacct/cpu.cfs_quota_us"),
            "{}",
            limit.source
        );
    }

    #[test]
    fn host_cgroup_v2_takes_the_tightest_ancestor() {
        let mountinfo = "25 1 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let cgroup = "0::/kubepods/pod1/ctr\n";
        let limit = cgroup_limit(
            cgroup,
            mountinfo,
            files(&[
                ("/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max", "max 100000\n"),
                ("/sys/fs/cgroup/kubepods/pod1/cpu.max", "200000 100000\n"),
                ("/sys/fs/cgroup/kubepods/cpu.max", "800000 100000\n"),
                ("/sys/fs/cgroup/cpu.max", "50000 100000\n"),
            ]),
        );
        // The mount point itself (the root cgroup) is read too; half a CPU is still one thread.
        assert_eq!(limit.unwrap().quota.cpus(), 1);

        let limit = cgroup_limit(
            cgroup,
            mountinfo,
            files(&[
                ("/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max", "max 100000\n"),
                ("/sys/fs/cgroup/kubepods/pod1/cpu.max", "200000 100000\n"),
                ("/sys/fs/cgroup/kubepods/cpu.max", "800000 100000\n"),
            ]),
        )
        .unwrap();
        assert_eq!(limit.quota.cpus(), 2);
        assert_eq!(limit.source, "/sys/fs/cgroup/kubepods/pod1/cpu.max");
    }

    #[test]
    fn no_limit_anywhere_is_none() {
        let mountinfo = "25 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_limit(
                "0::/user.slice\n",
                mountinfo,
                files(&[("/sys/fs/cgroup/user.slice/cpu.max", "max 100000\n")])
            ),
            None
        );
        assert_eq!(
            cgroup_limit("0::/\n", "", files(&[])),
            None,
            "no cgroup mount"
        );
    }

    #[test]
    fn the_decision_takes_the_smaller_budget_unless_told() {
        let limit = CgroupLimit {
            quota: Quota {
                quota_us: 100_000,
                period_us: 100_000,
            },
            source: "/sys/fs/cgroup/cpu.max".to_owned(),
        };
        let one = decide(None, Some(16), Some(&limit), 64);
        assert_eq!(one.count, 1);
        assert!(
            one.reason.starts_with("CPU limit 100000/100000"),
            "{}",
            one.reason
        );
        assert_eq!(decide(None, Some(2), None, 64).count, 2);
        let pinned = decide(
            None,
            Some(2),
            Some(&CgroupLimit {
                quota: Quota {
                    quota_us: 400_000,
                    period_us: 100_000,
                },
                source: String::new(),
            }),
            64,
        );
        assert_eq!(
            (pinned.count, pinned.reason.as_str()),
            (2, "CPU affinity (Cpus_allowed_list)")
        );
        assert_eq!(decide(None, None, None, 64).count, 64);
        assert_eq!(decide(None, None, None, 0).count, 1);
        let told = decide(Some(3), Some(2), Some(&limit), 64);
        assert_eq!(
            (told.count, told.reason.as_str()),
            (3, "--inference-threads")
        );
    }
}
