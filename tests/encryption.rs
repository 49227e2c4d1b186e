//! Encryption at rest (fscrypt) through the real server: an ext4 volume created with
//! `encrypted: "true"` and a Secret's `encryptionKey`, staged only with that secret, its
//! files unreadable in the image, and its snapshots, restores and clones opened with the
//! same Secret. Nothing is mounted or attached when the secret is missing or wrong, and the
//! secret never appears in a record, a log or an error.

mod common;

use std::collections::HashMap;
use std::fs;
use std::process::Command;

use common::*;
use csi::volume_capability::access_mode::Mode;
use csi_proto as csi;
use tonic::Code;

const KEY: &str = "correct horse battery staple, thirty-two bytes at least";
const OTHER: &str = "another Secret entirely, also long enough to be a key";
const SIZE: i64 = 64 << 20;
const CONTENT: &[u8] = b"a line only the key holder may read back from this volume";

fn secrets(key: &str) -> HashMap<String, String> {
    HashMap::from([("encryptionKey".to_owned(), key.to_owned())])
}

fn encrypted(
    name: &str,
    cap: csi::VolumeCapability,
    key: Option<&str>,
) -> csi::CreateVolumeRequest {
    let mut req = create_req(name, SIZE, cap);
    req.parameters = HashMap::from([("encrypted".to_owned(), "true".to_owned())]);
    req.secrets = key.map(secrets).unwrap_or_default();
    req
}

async fn create(env: &mut TestEnv, req: csi::CreateVolumeRequest) -> Result<String, tonic::Status> {
    env.csi
        .controller
        .create_volume(req)
        .await
        .map(|r| r.into_inner().volume.unwrap().volume_id)
}

async fn stage(
    env: &mut TestEnv,
    id: &str,
    staging: &str,
    key: Option<&str>,
) -> Result<(), tonic::Status> {
    env.csi
        .node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.into(),
            volume_capability: Some(ext4()),
            secrets: key.map(secrets).unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map(drop)
}

/// Stages with `key` and publishes at `name`: the published path.
async fn open(env: &mut TestEnv, id: &str, name: &str, key: &str) -> String {
    let (staging, target) = (env.path(&format!("{name}-stage")), env.path(name));
    stage(env, id, &staging, Some(key)).await.unwrap();
    env.publish(id, &staging, &target, ext4(), false)
        .await
        .unwrap();
    target
}

/// Whether `needle` occurs in the file at `path`.
fn contains(path: &std::path::Path, needle: &[u8]) -> bool {
    let bytes = fs::read(path).unwrap();
    bytes.windows(needle.len()).any(|w| w == needle)
}

fn mounts_under(env: &TestEnv) -> usize {
    kernel_state_under(env.dir.path()).0.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_volumes_open_only_with_their_secret() {
    let mut env = TestEnv::start().await;

    // Refused before anything is made.
    for (req, why) in [
        (encrypted("e-none", ext4(), None), "missing"),
        (encrypted("e-short", ext4(), Some("too short")), "32"),
        (
            encrypted("e-block", block_cap(Mode::SingleNodeWriter), Some(KEY)),
            "raw block",
        ),
        (
            encrypted("e-xfs", mount_cap("xfs", Mode::SingleNodeWriter), Some(KEY)),
            "ext4",
        ),
    ] {
        let err = create(&mut env, req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(why), "{}", err.message());
        assert!(!err.message().contains("too short"));
    }
    let mut bad = encrypted("e-bad", ext4(), Some(KEY));
    bad.parameters.insert("encrypted".into(), "yes".into());
    assert_eq!(code(create(&mut env, bad).await), Code::InvalidArgument);
    assert!(env.pool_entries().is_empty(), "{:?}", env.pool_entries());

    let id = create(&mut env, encrypted("enc", ext4(), Some(KEY)))
        .await
        .unwrap();
    // Idempotent with the same request.
    assert_eq!(
        create(&mut env, encrypted("enc", ext4(), Some(KEY)))
            .await
            .unwrap(),
        id
    );
    let record =
        fs::read_to_string(env.pool().join("volumes").join(&id).join("volume.json")).unwrap();
    assert!(record.contains("\"encryption\": \"v1."), "{record}");
    assert!(!record.contains(KEY));

    // No secret, or the wrong one: refused, nothing mounted or attached.
    let staging = env.path("enc-stage");
    let before = mounts_under(&env);
    let err = stage(&mut env, &id, &staging, None).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = stage(&mut env, &id, &staging, Some(OTHER))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(!err.message().contains(OTHER));
    assert_eq!(mounts_under(&env), before);
    env.assert_clean();

    // The right one: the pod sees an empty volume and writes to it.
    let target = open(&mut env, &id, "enc", KEY).await;
    assert!(
        fs::read_dir(&target).unwrap().next().is_none(),
        "the pod sees only its data"
    );
    fs::write(format!("{target}/secret.txt"), CONTENT).unwrap();
    fs::create_dir(format!("{target}/dir")).unwrap();
    assert!(Command::new("sync").status().unwrap().success());
    // A retried stage (the kubelet after a restart) keeps it open.
    stage(&mut env, &id, &staging, Some(KEY)).await.unwrap();
    assert_eq!(fs::read(format!("{target}/secret.txt")).unwrap(), CONTENT);
    // At rest, the image holds neither the content nor the name.
    let image = fs::read_dir(env.pool().join("volumes").join(&id))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_none_or(|x| x != "json") && p.is_file())
        .unwrap();
    assert!(
        !contains(&image, CONTENT),
        "the content is encrypted in the image"
    );
    assert!(
        !contains(&image, b"secret.txt"),
        "the names are encrypted too"
    );
    // The server's log never shows the key.
    assert!(!env.server_log().contains(KEY));

    // A snapshot restores with the same Secret, and only as an encrypted volume.
    let snap = env.snapshot("enc-snap", &id).await.unwrap().snapshot_id;
    let mut plain = create_req("restored-plain", SIZE, ext4());
    plain.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(snapshot_source(&snap)),
    });
    let err = create(&mut env, plain).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let mut wrong = encrypted("restored-wrong", ext4(), Some(OTHER));
    wrong.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(snapshot_source(&snap)),
    });
    assert_eq!(code(create(&mut env, wrong).await), Code::InvalidArgument);
    let mut restore = encrypted("restored", ext4(), Some(KEY));
    restore.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(snapshot_source(&snap)),
    });
    let restored = create(&mut env, restore).await.unwrap();
    let restored_at = open(&mut env, &restored, "restored", KEY).await;
    assert_eq!(
        fs::read(format!("{restored_at}/secret.txt")).unwrap(),
        CONTENT
    );
    // A clone of the live volume too.
    let mut clone = encrypted("cloned", ext4(), Some(KEY));
    clone.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: id.clone(),
            },
        )),
    });
    let cloned = create(&mut env, clone).await.unwrap();
    let cloned_at = open(&mut env, &cloned, "cloned", KEY).await;
    assert_eq!(
        fs::read(format!("{cloned_at}/secret.txt")).unwrap(),
        CONTENT
    );

    // An unencrypted source cannot become encrypted by a copy.
    let plain_id = env.create("plain", SIZE, ext4()).await.volume_id;
    let plain_snap = env
        .snapshot("plain-snap", &plain_id)
        .await
        .unwrap()
        .snapshot_id;
    let mut upgrade = encrypted("upgrade", ext4(), Some(KEY));
    upgrade.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(snapshot_source(&plain_snap)),
    });
    assert_eq!(code(create(&mut env, upgrade).await), Code::InvalidArgument);

    // Unstaged: the key leaves with the mount; staged again, the files are back.
    for (vol, name) in [(&id, "enc"), (&restored, "restored"), (&cloned, "cloned")] {
        env.unmount(vol, name).await;
    }
    env.assert_clean();
    let target = open(&mut env, &id, "enc", KEY).await;
    assert_eq!(fs::read(format!("{target}/secret.txt")).unwrap(), CONTENT);
    env.unmount(&id, "enc").await;

    // Rotated with the client (the keys in files, never on the command line): the old
    // value opens neither the volume nor its snapshot; the new one both.
    let (old_file, new_file) = (env.path("key-old"), env.path("key-new"));
    fs::write(&old_file, KEY).unwrap();
    fs::write(&new_file, OTHER).unwrap();
    let rekey = |old: &str, new: &str| {
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .args([
                "volume",
                "rekey",
                &id,
                "--key-file",
                old,
                "--new-key-file",
                new,
            ])
            .env("CSI_ENDPOINT", format!("unix://{}", env.path("csi.sock")))
            .output()
            .unwrap()
    };
    let third = env.path("key-third");
    fs::write(&third, "a third value that opens nothing here at all").unwrap();
    let wrong = rekey(&third, &new_file);
    assert!(!wrong.status.success());
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        said.contains("InvalidArgument") || said.contains("does not open"),
        "{said}"
    );
    assert!(!said.contains(KEY) && !said.contains(OTHER));
    let done = rekey(&old_file, &new_file);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        rekey(&old_file, &new_file).status.success(),
        "a retry finds it done"
    );
    let staging = env.path("enc-stage");
    assert_eq!(
        code(stage(&mut env, &id, &staging, Some(KEY)).await),
        Code::InvalidArgument
    );
    let target = open(&mut env, &id, "enc", OTHER).await;
    assert_eq!(fs::read(format!("{target}/secret.txt")).unwrap(), CONTENT);
    env.unmount(&id, "enc").await;
    let mut after = encrypted("after-rekey", ext4(), Some(OTHER));
    after.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(snapshot_source(&snap)),
    });
    let after = create(&mut env, after).await.unwrap();
    env.delete(&after).await.unwrap();
    assert!(!env.server_log().contains(KEY) && !env.server_log().contains(OTHER));

    for s in [&snap, &plain_snap] {
        env.delete_snapshot(s).await.unwrap();
    }
    for v in [&id, &restored, &cloned, &plain_id] {
        env.delete(v).await.unwrap();
    }
    assert!(!env.server_log().contains(KEY) && !env.server_log().contains(OTHER));
    env.stop();
    env.assert_clean();
}

/// Killed between the mount and the key: the kubelet's retried stage finds the mount, adds
/// the key and encrypts the data directory then; nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_killed_between_the_mount_and_the_key_is_finished_by_its_retry() {
    let mut env = TestEnv::start().await;
    let id = create(&mut env, encrypted("enc-crash", ext4(), Some(KEY)))
        .await
        .unwrap();
    env.restart(Some("stage:before-unlock")).await;
    let staging = env.path("crash-stage");
    assert!(stage(&mut env, &id, &staging, Some(KEY)).await.is_err());
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(env.wait_for_exit().signal(), Some(libc::SIGKILL));
    env.restart(None).await;
    let target = open(&mut env, &id, "crash", KEY).await;
    fs::write(format!("{target}/after"), CONTENT).unwrap();
    assert!(Command::new("sync").status().unwrap().success());
    env.unmount(&id, "crash").await;
    env.assert_clean();
    let image = env.pool().join("volumes").join(&id).join("image");
    assert!(
        !contains(&image, CONTENT),
        "written encrypted after the retry"
    );
    let target = open(&mut env, &id, "crash", KEY).await;
    assert_eq!(fs::read(format!("{target}/after")).unwrap(), CONTENT);
    env.unmount(&id, "crash").await;
    env.delete(&id).await.unwrap();
    env.stop();
    env.assert_clean();
}
