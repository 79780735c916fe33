//! The image `make image` writes (target/image/capy-webhooks.tar) and the `Dockerfile` describe
//! the same image: user, entrypoint, command, exposed ports, and the binary at the entrypoint's
//! path, executable, with the CA bundle and the passwd entry of its user.
//!
//! The Dockerfile is parsed here on its own (not with hack/image.sh's reader), and the tar is read
//! as any loader would: manifest.json → config → layers.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn image_tar() -> PathBuf {
    let tar = root().join("target/image/capy-webhooks.tar");
    assert!(
        tar.is_file(),
        "{} is missing: `make test` builds it first; by hand, run `make image`",
        tar.display()
    );
    tar
}

/// One file of a tar archive, through the `tar` command.
fn tar_file(archive: &Path, member: &str) -> Vec<u8> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg(member)
        .output()
        .expect("tar");
    assert!(out.status.success(), "tar -xOf {} {member} failed", archive.display());
    out.stdout
}

/// (path, mode, uid) of every entry of a layer.
fn layer_entries(layer: &[u8]) -> Vec<(String, String, String)> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.tar");
    std::fs::write(&path, layer).unwrap();
    let out = Command::new("tar")
        .args(["--numeric-owner", "-tvf"])
        .arg(&path)
        .output()
        .expect("tar");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = f[5..].join(" ");
            let name = name.split(" -> ").next().unwrap().trim_start_matches("./").to_string();
            (
                format!("/{}", name.trim_end_matches('/')),
                f[0].to_string(),
                f[1].to_string(),
            )
        })
        .collect()
}

#[derive(Debug, Default, PartialEq)]
struct Described {
    user: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    ports: BTreeSet<String>,
}

/// The final stage of the Dockerfile.
fn dockerfile() -> (Described, Vec<String>) {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let mut d = Described::default();
    let mut copied = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word.to_ascii_uppercase().as_str() {
            "FROM" => {
                d = Described::default();
                copied.clear();
            }
            "USER" => d.user = rest.trim().to_string(),
            "ENTRYPOINT" => d.entrypoint = serde_json::from_str(rest).expect("exec-form ENTRYPOINT"),
            "CMD" => d.cmd = serde_json::from_str(rest).expect("exec-form CMD"),
            "EXPOSE" => d.ports.extend(rest.split_whitespace().map(|p| {
                if p.contains('/') {
                    p.to_string()
                } else {
                    format!("{p}/tcp")
                }
            })),
            "COPY" => copied.push(rest.split_whitespace().last().unwrap().to_string()),
            _ => {}
        }
    }
    (d, copied)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
#[cfg_attr(not(target_os = "linux"), ignore = "images are built on Linux only (hack/image.sh)")]
fn the_built_image_is_the_one_the_dockerfile_describes() {
    let tar = image_tar();
    let manifest: Value = serde_json::from_slice(&tar_file(&tar, "manifest.json")).unwrap();
    let manifest = &manifest[0];
    // skopeo writes the fully qualified form of the same reference.
    let tag = manifest["RepoTags"][0].as_str().unwrap_or("");
    assert!(
        ["capy-webhooks:dev", "docker.io/library/capy-webhooks:dev"].contains(&tag),
        "tagged {tag}"
    );
    let config: Value = serde_json::from_slice(&tar_file(&tar, manifest["Config"].as_str().unwrap())).unwrap();
    assert_eq!(config["os"], "linux");
    let c = &config["config"];
    let built = Described {
        user: c["User"].as_str().unwrap_or("").to_string(),
        entrypoint: strings(&c["Entrypoint"]),
        cmd: strings(&c["Cmd"]),
        ports: c["ExposedPorts"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default(),
    };
    let (described, copied) = dockerfile();
    assert_eq!(built, described, "the image (left) and the Dockerfile (right) differ");
    let binary = &described.entrypoint[0];
    assert!(copied.contains(binary), "the Dockerfile copies no {binary}");

    let mut entries = Vec::new();
    for layer in manifest["Layers"].as_array().unwrap() {
        entries.extend(layer_entries(&tar_file(&tar, layer.as_str().unwrap())));
    }
    let entry = |path: &str| entries.iter().find(|(p, _, _)| p == path);
    let (_, mode, _) = entry(binary).unwrap_or_else(|| panic!("no {binary} in the image: {entries:?}"));
    assert!(mode.starts_with("-rwx"), "{binary} is {mode}");
    assert!(entry("/etc/ssl/certs/ca-certificates.crt").is_some(), "no CA bundle");

    // The user is a passwd entry (distroless' nonroot), not only a number.
    let layer = tar_file(&tar, manifest["Layers"][0].as_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.tar");
    std::fs::write(&path, &layer).unwrap();
    let mut passwd = String::new();
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(&path)
        .arg("etc/passwd")
        .output()
        .unwrap();
    out.stdout.as_slice().read_to_string(&mut passwd).unwrap();
    let uid = described.user.split(':').next().unwrap();
    assert!(
        passwd.lines().any(|l| l.split(':').nth(2) == Some(uid)),
        "no passwd entry for {uid}:\n{passwd}"
    );
}
