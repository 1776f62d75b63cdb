//! The container images `scripts/images.sh` builds: what `deploy/images/Containerfile` says of
//! their runtime stages, the images' own configuration (buildah), and a pod's view of an
//! image's root filesystem (read-only, with mount points the way a container runtime makes
//! them) to run its binary from, as UID 65532.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::repo_root;

/// The images' tag: the workspace version, the one the operator's default worker image has.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `ghcr.io/mailpipe/mailpipe-<binary>:<version>`.
pub fn image_name(binary: &str) -> String {
    format!("ghcr.io/mailpipe/mailpipe-{binary}:{VERSION}")
}

/// A runtime stage of the Containerfile (`FROM scratch AS <name>`), as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stage {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub user: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub expose: Vec<String>,
    /// Where each COPY puts what it copies (a trailing `/`: a directory's content).
    pub copies: Vec<String>,
}

/// The runtime stages of `deploy/images/Containerfile`, with `${VERSION}` read as `version`.
pub fn runtime_stages(version: &str) -> Vec<Stage> {
    let text = std::fs::read_to_string(repo_root().join("deploy/images/Containerfile"))
        .expect("deploy/images/Containerfile");
    parse_stages(&text, version)
}

fn parse_stages(text: &str, version: &str) -> Vec<Stage> {
    let joined = text.replace("\\\n", " ");
    let mut stages: Vec<Stage> = Vec::new();
    for line in joined.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (instruction, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim().replace("${VERSION}", version);
        if instruction == "FROM" {
            if let Some(name) = rest.strip_prefix("scratch AS ") {
                stages.push(Stage {
                    name: name.trim().to_string(),
                    ..Stage::default()
                });
            } else if !stages.is_empty() {
                panic!("a stage after the runtime ones: FROM {rest}");
            }
            continue;
        }
        let Some(stage) = stages.last_mut() else {
            continue;
        };
        match instruction {
            "LABEL" => stage.labels.extend(key_values(&rest)),
            "USER" => stage.user = rest,
            "ENTRYPOINT" => stage.entrypoint = serde_json::from_str(&rest).expect("exec form"),
            "CMD" => stage.cmd = serde_json::from_str(&rest).expect("exec form"),
            "EXPOSE" => stage
                .expose
                .extend(rest.split_whitespace().map(String::from)),
            "COPY" => stage.copies.push(
                rest.split_whitespace()
                    .last()
                    .expect("a COPY destination")
                    .to_string(),
            ),
            "ARG" => {}
            other => panic!("a runtime stage instruction the test does not know: {other}"),
        }
    }
    stages
}

/// `a="x y" b="z"` as pairs.
fn key_values(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("key=\"value\"");
        let (value, after) = after.split_once('"').expect("a closing quote");
        pairs.push((key.trim().to_string(), value.to_string()));
        rest = after.trim();
    }
    pairs
}

/// buildah on the images' store (`MAILPIPE_IMAGE_STORE`, default `~/.cache/mailpipe/images`).
fn buildah_command(args: &[&str]) -> Command {
    let store = std::env::var_os("MAILPIPE_IMAGE_STORE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/mailpipe/images")
        });
    let mut command = Command::new("buildah");
    command
        .args(["--storage-driver", "vfs", "--root"])
        .arg(store.join("root"))
        .arg("--runroot")
        .arg(store.join("run"))
        .args(args);
    command
}

/// What buildah prints; fails the test when it fails.
pub fn buildah(args: &[&str]) -> String {
    crate::process::run(
        &mut buildah_command(args),
        &format!("buildah {args:?} (scripts/images.sh builds the images)"),
    )
}

/// The image's OCI configuration (`User`, `Entrypoint`, `Cmd`, `Labels`, `ExposedPorts`).
pub fn image_config(image: &str) -> serde_json::Value {
    let inspected: serde_json::Value =
        serde_json::from_str(&buildah(&["inspect", "--type", "image", image]))
            .expect("buildah inspect prints JSON");
    inspected["OCIv1"]["config"].clone()
}

fn mount(args: &[&str]) {
    crate::process::run(Command::new("mount").args(args), &format!("mount {args:?}"));
}

/// A pod's view of an image: its root filesystem read-only, with host directories mounted
/// (read-only) at paths the image does not have, as a container runtime makes its mount
/// points. Unmounted and removed when dropped.
pub struct PodRoot {
    container: String,
    /// The image's root filesystem as buildah mounts it (the image's files, untouched).
    pub image_root: PathBuf,
    /// What the pod sees.
    pub root: PathBuf,
    mounted: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl PodRoot {
    pub fn new(image: &str, volumes: &[(&Path, &str)]) -> PodRoot {
        let container = buildah(&["from", "--pull-never", "--quiet", image])
            .trim()
            .to_string();
        let image_root = PathBuf::from(buildah(&["mount", &container]).trim());
        let dir = tempfile::tempdir().expect("temp dir");
        let (upper, work, root) = (
            dir.path().join("upper"),
            dir.path().join("work"),
            dir.path().join("root"),
        );
        for d in [&upper, &work, &root] {
            std::fs::create_dir_all(d).expect("overlay dirs");
        }
        // The mount points: the runtime's, not the image's.
        for (_, at) in volumes {
            std::fs::create_dir_all(upper.join(at.trim_start_matches('/'))).expect("mount point");
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            image_root.display(),
            upper.display(),
            work.display()
        );
        mount(&[
            "-t",
            "overlay",
            "overlay",
            "-o",
            &options,
            root.to_str().expect("UTF-8"),
        ]);
        let mut mounted = vec![root.clone()];
        for (from, at) in volumes {
            let target = root.join(at.trim_start_matches('/'));
            let target_text = target.to_str().expect("UTF-8");
            mount(&["--bind", from.to_str().expect("UTF-8"), target_text]);
            mount(&["-o", "remount,bind,ro", target_text]);
            mounted.push(target);
        }
        mount(&["-o", "remount,ro", root.to_str().expect("UTF-8")]);
        PodRoot {
            container,
            image_root,
            root,
            mounted,
            _dir: dir,
        }
    }

    /// `program` run inside, as UID/GID 65532, with nothing of this process's environment
    /// but `env`.
    pub fn command(&self, program: &str, env: &[(String, String)]) -> Command {
        let mut command = Command::new("/usr/sbin/chroot");
        command
            .env_clear()
            .envs(env.iter().cloned())
            .arg("--userspec=65532:65532")
            .arg(&self.root)
            .arg(program);
        command
    }
}

impl Drop for PodRoot {
    fn drop(&mut self) {
        for path in self.mounted.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(path).status();
        }
        let _ = buildah_command(&["rm", &self.container]).output();
    }
}

/// Whether an ELF file asks for a dynamic loader (a `PT_INTERP` program header).
pub fn is_dynamically_linked(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF", "an ELF file");
    assert_eq!(elf[4], 2, "64-bit");
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let at = phoff + i * size;
        u32::from_le_bytes(elf[at..at + 4].try_into().expect("4 bytes")) == 3
    })
}

/// Every file and symbolic link under `root`, relative, with its size.
pub fn files(root: &Path) -> BTreeMap<String, u64> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u64>) {
        for entry in std::fs::read_dir(dir).expect("readable") {
            let entry = entry.expect("an entry");
            let meta = entry.path().symlink_metadata().expect("metadata");
            if meta.is_dir() {
                walk(root, &entry.path(), out);
            } else {
                let relative = entry
                    .path()
                    .strip_prefix(root)
                    .expect("under root")
                    .to_owned();
                out.insert(relative.display().to_string(), meta.len());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_that_asks_for_a_loader_is_dynamically_linked() {
        // This test program is linked against glibc's loader.
        let this = std::fs::read(std::env::current_exe().expect("the test binary")).expect("read");
        assert!(is_dynamically_linked(&this));
    }

    #[test]
    fn stages_are_read_with_continuations_labels_and_exec_forms() {
        let text = "FROM rust AS build\nRUN make\n\nFROM scratch AS worker\nARG VERSION=1\n\
                    LABEL a=\"x y\" \\\n      b=\"${VERSION}\"\nCOPY --from=build /out/w /usr/bin/w\n\
                    USER 65532:65532\nEXPOSE 9090\nENTRYPOINT [\"/usr/bin/w\"]\nCMD [\"run\"]\n";
        let stages = parse_stages(text, "2.0");
        assert_eq!(
            stages,
            vec![Stage {
                name: "worker".into(),
                labels: BTreeMap::from([("a".into(), "x y".into()), ("b".into(), "2.0".into())]),
                user: "65532:65532".into(),
                entrypoint: vec!["/usr/bin/w".into()],
                cmd: vec!["run".into()],
                expose: vec!["9090".into()],
                copies: vec!["/usr/bin/w".into()],
            }]
        );
    }
}
