use super::validate::{Problems, RawConfig, RawStore, RawTable, SECTIONS, SUBTABLES};
use super::values::{GIB, KIB, RawNumber, RawSize, fmt_size};
use super::*;
use crate::config::values::{parse_duration, parse_size};
use crate::model::command::CommandName;
use crate::model::glob::KeyGlob;
use crate::model::rules::{Rule, UnknownKeys, ValueType};
use crate::model::text::{edit_distance, suggest};
use std::os::unix::fs::PermissionsExt;

const FILE: &str = "/test/edgesync.toml";
const EXAMPLE: &str = include_str!("../../config/edgesync.example.toml");
const DEV: &str = include_str!("../../config/dev.toml");

/// A valid config over plain TCP (no certificate files needed): `mqtt_extra` goes into
/// `[mqtt]`, `rest` after it (further sections).
fn plain(mqtt_extra: &str, rest: &str) -> String {
    format!(
        "[device]\nid = \"pump-0042\"\n\n[mqtt]\nurl = \"mqtt://localhost\"\n\
             allow_plaintext = true\n{mqtt_extra}\n\n{rest}\n"
    )
}

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_toml_str(Path::new(FILE), text)
}

fn valid(text: &str) -> Config {
    parse(text).unwrap_or_else(|err| panic!("expected a valid config, got:\n{err}"))
}

fn problems(text: &str) -> Vec<Problem> {
    match parse(text) {
        Ok(config) => panic!("expected problems, got {config:#?}"),
        Err(err) => err.problems,
    }
}

fn keys(problems: &[Problem]) -> Vec<&str> {
    problems.iter().map(|p| p.key.as_str()).collect()
}

/// The only problem of `text`, which must be for `key`; returns its message.
fn only_problem(text: &str, key: &str) -> String {
    let problems = problems(text);
    assert_eq!(keys(&problems), [key], "{problems:#?}");
    problems[0].message.clone()
}

/// A directory holding `edgesync.toml`, `ca.pem`, `device.pem` and `device.key`.
fn tls_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["ca.pem", "device.pem", "device.key"] {
        std::fs::write(dir.path().join(name), "-----BEGIN TEST-----\n").unwrap();
    }
    private(&dir.path().join("device.key"));
    dir
}

/// Mode 0600: the agent refuses secrets that other users can read.
fn private(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn tls_config(extra_mqtt: &str) -> String {
    format!(
        "[device]\nid = \"pump-0042\"\n[mqtt]\nurl = \"mqtts://broker.example.com\"\n\
             ca = \"ca.pem\"\n{extra_mqtt}\n"
    )
}

// --- valid files -----------------------------------------------------------------------

#[test]
fn defaults_apply_when_optional_keys_are_omitted() {
    let config = valid(&plain("", ""));
    assert_eq!(config.source, Path::new(FILE));
    assert_eq!(config.device.id.as_str(), "pump-0042");
    let mqtt = &config.mqtt;
    assert_eq!(mqtt.url.to_string(), "mqtt://localhost:1883");
    assert_eq!(mqtt.topic_prefix, "edgesync");
    assert_eq!((&mqtt.ca, &mqtt.cert, &mqtt.key), (&None, &None, &None));
    assert_eq!(mqtt.keep_alive, Duration::from_secs(30));
    assert_eq!(mqtt.client_id, "pump-0042");
    assert_eq!((&mqtt.username, &mqtt.password_file), (&None, &None));
    assert!(mqtt.allow_plaintext);
    assert_eq!(
        config.store.path,
        Path::new("/var/lib/edgesync/edgesync.redb")
    );
    assert_eq!(config.store.max_bytes, 256 * MIB);
    assert_eq!(config.store.when_full, WhenFull::DropOldest);
    assert_eq!(config.store.cache_size, MIB);
    assert_eq!(config.sync.encoding, Encoding::Cbor);
    assert_eq!(config.sync.batch_max_changes, 1000);
    assert_eq!(config.sync.batch_max_bytes, 256 * KIB);
    assert!(config.sync.batch_max_bytes >= MAX_VALUE_BYTES + KIB);
    assert_eq!(config.sync.linger, Duration::ZERO);
    assert_eq!(config.sync.max_inflight, 8);
    assert_eq!(config.sync.compression, Compression::None);
    assert_eq!(config.local.socket, Path::new(DEFAULT_SOCKET));
    assert_eq!(config.log.level, "info");
}

#[test]
fn every_key_can_be_set() {
    let config = valid(&plain(
        "topic_prefix = \"acme/fleet\"\nkeep_alive = \"1m\"\nclient_id = \"pump-0042-a\"\n\
             username = \"pump\"",
        "[store]\npath = \"/data/q.redb\"\nmax_bytes = \"1GiB\"\nwhen_full = \"reject\"\n\
             cache_size = 2097152\n\
             [sync]\nencoding = \"json\"\nbatch_max_changes = 50\nbatch_max_bytes = \"1MB\"\n\
             linger = \"250ms\"\nmax_inflight = 1\ncompression = \"gzip\"\n\
             [local]\nsocket = \"/run/es.sock\"\n\
             [log]\nlevel = \"warn,edgesync::sync=trace\"",
    ));
    assert_eq!(config.mqtt.topic_prefix, "acme/fleet");
    assert_eq!(config.mqtt.keep_alive, Duration::from_secs(60));
    assert_eq!(config.mqtt.client_id, "pump-0042-a");
    assert_eq!(config.mqtt.username.as_deref(), Some("pump"));
    assert_eq!(config.store.path, Path::new("/data/q.redb"));
    assert_eq!(config.store.max_bytes, GIB);
    assert_eq!(config.store.when_full, WhenFull::Reject);
    assert_eq!(config.store.cache_size, 2 * MIB);
    assert_eq!(config.sync.encoding, Encoding::Json);
    assert_eq!(config.sync.batch_max_changes, 50);
    assert_eq!(config.sync.batch_max_bytes, 1_000_000);
    assert_eq!(config.sync.linger, Duration::from_millis(250));
    assert_eq!(config.sync.max_inflight, 1);
    assert_eq!(config.sync.compression, Compression::Gzip);
    assert_eq!(config.local.socket, Path::new("/run/es.sock"));
    assert_eq!(config.log.level, "warn,edgesync::sync=trace");
}

#[test]
fn secrets_accessible_to_others_and_a_world_writable_config_are_refused() {
    let dir = tls_dir();
    let (key, pw) = (dir.path().join("device.key"), dir.path().join("pw"));
    std::fs::write(&pw, "secret").unwrap();
    let file = dir.path().join("edgesync.toml");
    let text = tls_config(
        "cert = \"device.pem\"\nkey = \"device.key\"\nusername = \"u\"\n\
             password_file = \"pw\"",
    );
    std::fs::write(&file, text).unwrap();
    let chmod = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    // Owner only, or owner and group (root:edgesync 0640): accepted.
    for mode in [0o600, 0o640, 0o400] {
        chmod(&key, mode);
        chmod(&pw, mode);
        Config::load(&file).unwrap_or_else(|err| panic!("{mode:o}: {err}"));
    }
    chmod(&key, 0o604);
    chmod(&pw, 0o601);
    let errors = Config::load(&file).unwrap_err();
    assert_eq!(keys(&errors.problems), ["mqtt.key", "mqtt.password_file"]);
    let key_msg = &errors.problems[0].message;
    assert!(key_msg.contains(&*key.to_string_lossy()), "{key_msg}");
    assert!(key_msg.contains("mode 0604"), "{key_msg}");
    assert!(key_msg.contains("chmod 600"), "{key_msg}");
    assert!(errors.problems[1].message.contains("mode 0601"));
    chmod(&key, 0o600);
    chmod(&pw, 0o600);
    // The config file: readable by all is fine, writable by all is not.
    chmod(&file, 0o644);
    Config::load(&file).unwrap_or_else(|err| panic!("{err}"));
    chmod(&file, 0o666);
    let errors = Config::load(&file).unwrap_err();
    assert_eq!(keys(&errors.problems), [""]);
    assert!(errors.problems[0].message.contains("mode 0666"));
    assert!(errors.problems[0].message.contains("chmod 640"));
}

#[test]
fn tls_config_with_readable_certificate_files_loads_from_disk() {
    let dir = tls_dir();
    std::fs::write(dir.path().join("password"), "secret\n").unwrap();
    private(&dir.path().join("password"));
    let file = dir.path().join("edgesync.toml");
    let text = tls_config(
        "cert = \"device.pem\"\nkey = \"device.key\"\nusername = \"pump\"\n\
             password_file = \"password\"",
    );
    std::fs::write(&file, text).unwrap();
    let config = Config::load(&file).unwrap_or_else(|err| panic!("{err}"));
    let mqtt = &config.mqtt;
    assert_eq!(mqtt.url.to_string(), "mqtts://broker.example.com:8883");
    assert!(mqtt.url.tls);
    assert!(!mqtt.allow_plaintext);
    assert_eq!(mqtt.ca.as_deref(), Some(&*dir.path().join("ca.pem")));
    assert_eq!(mqtt.cert.as_deref(), Some(&*dir.path().join("device.pem")));
    assert_eq!(mqtt.key.as_deref(), Some(&*dir.path().join("device.key")));
    assert_eq!(
        mqtt.password_file.as_deref(),
        Some(&*dir.path().join("password"))
    );
    assert_eq!(config.source, file);
}

#[test]
fn relative_paths_resolve_against_the_config_file_directory() {
    let dir = tls_dir();
    let conf_dir = dir.path().join("conf");
    std::fs::create_dir(&conf_dir).unwrap();
    let text = format!(
        "[device]\nid = \"d\"\n[mqtt]\nurl = \"mqtts://h\"\nca = \"../ca.pem\"\n\
             cert = \"{}\"\nkey = \"../device.key\"\n\
             [store]\npath = \"../state/not-yet/edgesync.redb\"\n",
        dir.path().join("device.pem").display()
    );
    let config = Config::from_toml_str(&conf_dir.join("edgesync.toml"), &text)
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(config.mqtt.ca, Some(conf_dir.join("../ca.pem")));
    // Absolute paths stay as they are.
    assert_eq!(config.mqtt.cert, Some(dir.path().join("device.pem")));
    assert_eq!(config.mqtt.key, Some(conf_dir.join("../device.key")));
    // The store's directory need not exist: the daemon creates it.
    assert_eq!(
        config.store.path,
        conf_dir.join("../state/not-yet/edgesync.redb")
    );
}

#[test]
fn relative_config_path_keeps_paths_relative_to_the_working_directory() {
    let config = Config::from_toml_str(
        Path::new("config/dev-plain.toml"),
        &plain("", "[store]\npath = \"../target/dev/q.redb\""),
    )
    .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(config.store.path, Path::new("config/../target/dev/q.redb"));
    let config = Config::from_toml_str(
        Path::new("edgesync.toml"),
        &plain("", "[store]\npath = \"q.redb\""),
    )
    .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(config.store.path, Path::new("q.redb"));
}

// --- required keys, unknown keys, types ------------------------------------------------

#[test]
fn missing_device_id_is_reported() {
    let message = only_problem(
        "[mqtt]\nurl = \"mqtt://h\"\nallow_plaintext = true\n",
        "device.id",
    );
    assert!(message.contains("missing required key"), "{message}");
    assert!(message.contains("[A-Za-z0-9_.-]"), "{message}");
}

#[test]
fn missing_mqtt_section_is_reported_once() {
    let message = only_problem("[device]\nid = \"d\"\n", "mqtt");
    assert!(
        message.contains("missing required section [mqtt]"),
        "{message}"
    );
}

#[test]
fn missing_mqtt_url_is_reported() {
    let message = only_problem("[device]\nid = \"d\"\n[mqtt]\n", "mqtt.url");
    assert!(message.contains("missing required key"), "{message}");
    assert!(message.contains("mqtts://"), "{message}");
}

#[test]
fn empty_file_reports_every_missing_required_key() {
    assert_eq!(keys(&problems("")), ["device.id", "mqtt"]);
}

#[test]
fn unknown_key_is_reported_with_a_suggestion() {
    let message = only_problem(&plain("keepalive = \"30s\"", ""), "mqtt.keepalive");
    assert!(message.starts_with("unknown key"), "{message}");
    assert!(
        message.contains("did you mean \"keep_alive\"?"),
        "{message}"
    );
    assert!(
        message.contains("expected one of url, topic_prefix, ca, cert, key, keep_alive"),
        "{message}"
    );
}

#[test]
fn unknown_key_without_a_close_match_lists_the_expected_keys() {
    let message = only_problem(&plain("", "[sync]\nzstd = true"), "sync.zstd");
    assert_eq!(
        message,
        "unknown key; expected one of encoding, batch_max_changes, batch_max_bytes, \
             linger, max_inflight, compression"
    );
}

#[test]
fn key_in_the_wrong_section_names_its_section() {
    let message = only_problem(&plain("when_full = \"reject\"", ""), "mqtt.when_full");
    assert!(message.contains("it belongs in [store]"), "{message}");
}

#[test]
fn unknown_sections_are_reported_including_those_not_supported_yet() {
    let problems = problems(&plain(
        "",
        "[contrl]\n[mqt]\nurl = \"x\"\n[desierd]\n[telemetri]",
    ));
    assert_eq!(
        keys(&problems),
        ["contrl", "desierd", "mqt", "telemetri"],
        "{problems:#?}"
    );
    for problem in &problems {
        assert!(
            problem.message.starts_with("unknown section"),
            "{problem:?}"
        );
    }
    assert!(problems[1].message.contains("did you mean [desired]?"));
    assert!(problems[2].message.contains("did you mean [mqtt]?"));
    assert!(
        problems[0]
            .message
            .contains("[device], [mqtt], [store], [sync], [local], [log], [telemetry], [desired]"),
        "{problems:#?}"
    );
}

#[test]
fn key_outside_any_section_is_reported() {
    let message = only_problem(
        &format!("socket = \"/x.sock\"\n{}", plain("", "")),
        "socket",
    );
    assert!(message.contains("outside any section"), "{message}");
    assert!(message.contains("it belongs in [local]"), "{message}");
}

#[test]
fn wrong_type_is_reported_with_what_was_expected_and_found() {
    let message = only_problem(
        &plain("", "[sync]\nbatch_max_changes = \"1000\""),
        "sync.batch_max_changes",
    );
    assert_eq!(message, "expected an integer, found a string \"1000\"");

    let message = only_problem(&plain("keep_alive = 30", ""), "mqtt.keep_alive");
    assert_eq!(
        message,
        "expected a duration string such as \"30s\", found an integer 30"
    );

    let message = only_problem(&plain("", "[store]\nmax_bytes = 1.5"), "store.max_bytes");
    assert!(message.ends_with("found a float 1.5"), "{message}");

    let message = only_problem(&format!("log = \"debug\"\n{}", plain("", "")), "log");
    assert_eq!(message, "expected a table [log], found a string \"debug\"");
}

#[test]
fn value_of_the_wrong_type_is_not_also_reported_as_missing() {
    let message = only_problem(
        "[device]\nid = 42\n[mqtt]\nurl = \"mqtt://h\"\nallow_plaintext = true\n",
        "device.id",
    );
    assert_eq!(message, "expected a string, found an integer 42");
    let found = problems("device = 1\n[mqtt]\nurl = \"mqtt://h\"\nallow_plaintext = true\n");
    assert_eq!(keys(&found), ["device"], "{found:#?}");
    let found = problems("mqtt = [1]\n[device]\nid = \"d\"\n");
    assert_eq!(keys(&found), ["mqtt"], "{found:#?}");
    // Below [device], `mqtt = ...` is a key of [device].
    let found = problems("[device]\nid = \"d\"\nmqtt = [1]\n");
    assert_eq!(keys(&found), ["device.mqtt", "mqtt"], "{found:#?}");
}

// --- device ----------------------------------------------------------------------------

#[test]
fn invalid_device_ids_are_rejected() {
    let long = "a".repeat(65);
    for id in ["", "pump 42", "pump/42", "pümp", "+", long.as_str()] {
        let text =
            format!("[device]\nid = {id:?}\n[mqtt]\nurl = \"mqtt://h\"\nallow_plaintext = true\n");
        let message = only_problem(&text, "device.id");
        assert!(
            message.starts_with("expected 1-64 characters of [A-Za-z0-9_.-], found"),
            "{id:?}: {message}"
        );
    }
}

#[test]
fn device_id_accepts_the_allowed_characters() {
    let max = "Z".repeat(64);
    for id in ["a", "pump-0042", "A.b_C-9", max.as_str()] {
        let parsed: DeviceId = id.parse().unwrap();
        assert_eq!(parsed.as_str(), id);
        assert_eq!(parsed.to_string(), id);
        assert_eq!(DeviceId::try_from(id.to_owned()).unwrap(), parsed);
    }
    assert!("a b".parse::<DeviceId>().is_err());
    assert!(DeviceId::try_from(String::new()).is_err());
}

// --- mqtt ------------------------------------------------------------------------------

#[test]
fn unsupported_url_scheme_names_the_allowed_schemes() {
    for url in ["ssl://h:8883", "tcp://h", "wss://h/mqtt", "https://h"] {
        let message = only_problem(
            &format!("[device]\nid = \"d\"\n[mqtt]\nurl = {url:?}\nallow_plaintext = true\n"),
            "mqtt.url",
        );
        assert!(message.starts_with("unsupported scheme"), "{message}");
        assert!(message.contains("mqtts://"), "{message}");
        assert!(message.contains("mqtt://"), "{message}");
    }
}

#[test]
fn broker_urls_parse_with_default_ports() {
    let cases = [
        (
            "mqtts://broker.example.com:8883",
            true,
            "broker.example.com",
            8883,
        ),
        (
            "mqtts://broker.example.com",
            true,
            "broker.example.com",
            8883,
        ),
        (
            "mqtts://broker.example.com/",
            true,
            "broker.example.com",
            8883,
        ),
        ("mqtt://10.0.0.1", false, "10.0.0.1", 1883),
        ("mqtt://localhost:1884/", false, "localhost", 1884),
        ("MQTTS://Host_1:1", true, "Host_1", 1),
        ("mqtts://[::1]", true, "::1", 8883),
        ("mqtts://[2001:db8::1]:9000", true, "2001:db8::1", 9000),
    ];
    for (text, tls, host, port) in cases {
        let url: BrokerUrl = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(
            url,
            BrokerUrl {
                tls,
                host: host.to_owned(),
                port
            },
            "{text}"
        );
    }
}

#[test]
fn broker_urls_with_anything_but_host_and_port_are_rejected() {
    for text in [
        "",
        "broker.example.com:8883",
        "mqtts://",
        "mqtts://:8883",
        "mqtts://h:",
        "mqtts://h:0",
        "mqtts://h:65536",
        "mqtts://h:+80",
        "mqtts://h:port",
        "mqtts://h:8883/topic",
        "mqtts://h:8883//",
        "mqtts://h?x=1",
        "mqtts://user:pw@h",
        "mqtts://h h",
        "mqtts://::1",
        "mqtts://[::1",
        "mqtts://[nothost]",
        "mqtts://[::1]8883",
    ] {
        assert!(text.parse::<BrokerUrl>().is_err(), "{text:?} was accepted");
    }
}

#[test]
fn broker_url_displays_in_canonical_form() {
    for (text, shown) in [
        ("mqtts://h", "mqtts://h:8883"),
        ("MQTT://h:1/", "mqtt://h:1"),
        ("mqtts://[::1]", "mqtts://[::1]:8883"),
    ] {
        let url: BrokerUrl = text.parse().unwrap();
        assert_eq!(url.to_string(), shown);
        assert_eq!(url.to_string().parse::<BrokerUrl>().unwrap(), url);
    }
}

#[test]
fn plaintext_url_without_allow_plaintext_is_rejected() {
    let message = only_problem(
        "[device]\nid = \"d\"\n[mqtt]\nurl = \"mqtt://broker:1883\"\n",
        "mqtt.url",
    );
    assert!(message.contains("plaintext"), "{message}");
    assert!(message.contains("allow_plaintext = true"), "{message}");
    let message = only_problem(
        "[device]\nid = \"d\"\n[mqtt]\nurl = \"mqtt://b\"\nallow_plaintext = false\n",
        "mqtt.url",
    );
    assert!(message.contains("plaintext"), "{message}");
}

#[test]
fn plaintext_url_with_allow_plaintext_is_accepted_without_ca() {
    let config =
        valid("[device]\nid = \"d\"\n[mqtt]\nurl = \"mqtt://b\"\nallow_plaintext = true\n");
    assert!(!config.mqtt.url.tls);
    assert!(config.mqtt.allow_plaintext);
    assert_eq!(config.mqtt.ca, None);
}

#[test]
fn certificate_files_with_a_plaintext_url_are_rejected() {
    let problems = problems(&plain(
        "ca = \"/etc/ca.pem\"\ncert = \"/etc/d.pem\"\nkey = \"/etc/d.key\"",
        "",
    ));
    assert_eq!(keys(&problems), ["mqtt.ca", "mqtt.cert", "mqtt.key"]);
    assert!(problems[0].message.contains("plaintext"), "{problems:#?}");
}

#[test]
fn tls_url_without_ca_is_rejected() {
    let message = only_problem(
        "[device]\nid = \"d\"\n[mqtt]\nurl = \"mqtts://b\"\n",
        "mqtt.ca",
    );
    assert!(message.contains("missing"), "{message}");
    assert!(message.contains("CA"), "{message}");
}

#[test]
fn missing_ca_file_names_the_path_and_the_os_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgesync.toml");
    let errors = Config::from_toml_str(&file, &tls_config("")).unwrap_err();
    assert_eq!(keys(&errors.problems), ["mqtt.ca"]);
    let ca = dir.path().join("ca.pem");
    assert_eq!(
        errors.problems[0].message,
        format!(
            "cannot read \"{}\": No such file or directory (os error 2)",
            ca.display()
        )
    );
}

#[test]
fn ca_that_is_a_directory_is_rejected() {
    let dir = tls_dir();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    let text = tls_config("").replace("ca.pem", "certs");
    let errors = Config::from_toml_str(&dir.path().join("e.toml"), &text).unwrap_err();
    assert_eq!(keys(&errors.problems), ["mqtt.ca"]);
    assert!(
        errors.problems[0].message.contains("is a directory"),
        "{errors}"
    );
}

#[test]
fn client_certificate_without_its_key_is_rejected() {
    let dir = tls_dir();
    let file = dir.path().join("e.toml");
    let errors = Config::from_toml_str(&file, &tls_config("cert = \"device.pem\"")).unwrap_err();
    assert_eq!(keys(&errors.problems), ["mqtt.key"]);
    assert!(
        errors.problems[0]
            .message
            .contains("set both cert and key, or neither")
    );

    let errors = Config::from_toml_str(&file, &tls_config("key = \"device.key\"")).unwrap_err();
    assert_eq!(keys(&errors.problems), ["mqtt.cert"]);
}

#[test]
fn missing_client_certificate_files_are_reported_each() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
    let errors = Config::from_toml_str(
        &dir.path().join("e.toml"),
        &tls_config("cert = \"device.pem\"\nkey = \"device.key\""),
    )
    .unwrap_err();
    assert_eq!(keys(&errors.problems), ["mqtt.cert", "mqtt.key"]);
    assert!(errors.problems[1].message.contains("device.key"));
}

#[test]
fn password_file_needs_a_username_and_must_be_readable() {
    let dir = tls_dir();
    std::fs::write(dir.path().join("pw"), "secret").unwrap();
    private(&dir.path().join("pw"));
    let file = dir.path().join("e.toml");
    let errors = Config::from_toml_str(&file, &tls_config("password_file = \"pw\"")).unwrap_err();
    assert_eq!(keys(&errors.problems), ["mqtt.password_file"]);
    assert!(errors.problems[0].message.contains("without mqtt.username"));

    let errors = Config::from_toml_str(
        &file,
        &tls_config("username = \"u\"\npassword_file = \"missing\""),
    )
    .unwrap_err();
    assert_eq!(keys(&errors.problems), ["mqtt.password_file"]);
    assert!(errors.problems[0].message.starts_with("cannot read"));
}

#[test]
fn username_must_not_be_empty() {
    only_problem(&plain("username = \"\"", ""), "mqtt.username");
}

#[test]
fn topic_prefix_rules_are_enforced() {
    for prefix in ["acme", "acme/fleet-1", "a b", &"p".repeat(128)] {
        let config = valid(&plain(&format!("topic_prefix = {prefix:?}"), ""));
        assert_eq!(config.mqtt.topic_prefix, prefix);
    }
    for prefix in [
        "",
        "a/+",
        "#",
        "a\u{0}b",
        "/acme",
        "acme/",
        &"p".repeat(129),
    ] {
        only_problem(
            &plain(&format!("topic_prefix = {prefix:?}"), ""),
            "mqtt.topic_prefix",
        );
    }
}

#[test]
fn client_id_defaults_to_the_device_id_and_is_checked() {
    assert_eq!(valid(&plain("", "")).mqtt.client_id, "pump-0042");
    assert_eq!(
        valid(&plain("client_id = \"any id/ü\"", "")).mqtt.client_id,
        "any id/ü"
    );
    for id in ["", "a\nb", &"c".repeat(129)] {
        only_problem(&plain(&format!("client_id = {id:?}"), ""), "mqtt.client_id");
    }
}

#[test]
fn keep_alive_must_be_whole_seconds_from_5s_to_65535s() {
    for (text, secs) in [("5s", 5), ("65535s", 65535), ("2m", 120), ("5000ms", 5)] {
        let config = valid(&plain(&format!("keep_alive = {text:?}"), ""));
        assert_eq!(config.mqtt.keep_alive, Duration::from_secs(secs));
    }
    for text in ["4s", "0", "65536s", "1d", "5500ms"] {
        let message = only_problem(
            &plain(&format!("keep_alive = {text:?}"), ""),
            "mqtt.keep_alive",
        );
        assert!(message.starts_with("expected"), "{message}");
    }
}

#[test]
fn the_reconnect_backoff_cap_is_100ms_to_1h_and_not_below_the_first_ceiling() {
    let config = valid(&plain("reconnect_max = \"10m\"", ""));
    assert_eq!(config.mqtt.reconnect_max, Duration::from_secs(600));
    let config = valid(&plain("", ""));
    assert_eq!(
        config.mqtt.reconnect_max,
        Duration::from_secs(30),
        "default"
    );
    for text in ["50ms", "2h"] {
        let message = only_problem(
            &plain(&format!("reconnect_max = {text:?}"), ""),
            "mqtt.reconnect_max",
        );
        assert!(message.contains("100ms to 1h"), "{message}");
    }
    let message = only_problem(
        &plain("reconnect_initial = \"10s\"\nreconnect_max = \"5s\"", ""),
        "mqtt.reconnect_max",
    );
    assert!(
        message.contains("must not be below mqtt.reconnect_initial"),
        "{message}"
    );
}

#[test]
fn the_reconnect_jitter_is_full_by_default_or_none() {
    let config = valid(&plain("", ""));
    assert_eq!(
        config.mqtt.reconnect_jitter,
        ReconnectJitter::Full,
        "default"
    );
    let config = valid(&plain("reconnect_jitter = \"none\"", ""));
    assert_eq!(config.mqtt.reconnect_jitter, ReconnectJitter::None);
    for (bad, says) in [
        ("\"half\"", "expected \"full\" or \"none\", found \"half\""),
        ("\"None\"", "did you mean \"none\"?"),
        ("false", "expected a string"),
    ] {
        let message = only_problem(
            &plain(&format!("reconnect_jitter = {bad}"), ""),
            "mqtt.reconnect_jitter",
        );
        assert!(message.contains(says), "{message}");
    }
}

#[test]
fn bad_duration_is_reported() {
    let message = only_problem(&plain("keep_alive = \"30 sec\"", ""), "mqtt.keep_alive");
    assert!(message.contains("unknown unit \"sec\""), "{message}");
    let message = only_problem(&plain("", "[sync]\nlinger = \"-1ms\""), "sync.linger");
    assert!(message.contains("negative"), "{message}");
}

// --- store -----------------------------------------------------------------------------

#[test]
fn bad_size_is_reported() {
    let message = only_problem(
        &plain("", "[store]\nmax_bytes = \"lots\""),
        "store.max_bytes",
    );
    assert!(message.starts_with("expected a size such as"), "{message}");
    assert!(message.contains("\"lots\""), "{message}");
    let message = only_problem(
        &plain("", "[store]\nmax_bytes = \"512KiB\""),
        "store.max_bytes",
    );
    assert_eq!(
        message,
        "expected at least 1MiB (1048576 bytes), found 512KiB (524288 bytes)"
    );
    let message = only_problem(&plain("", "[store]\nmax_bytes = -1"), "store.max_bytes");
    assert!(message.contains("found -1"), "{message}");
}

#[test]
fn sizes_may_be_integer_numbers_of_bytes() {
    let config = valid(&plain(
        "",
        "[store]\nmax_bytes = 2097152\ncache_size = 262144\n[sync]\nbatch_max_bytes = 66560",
    ));
    assert_eq!(config.store.max_bytes, 2 * MIB);
    assert_eq!(config.store.cache_size, 256 * KIB);
    assert_eq!(config.sync.batch_max_bytes, 66560);
}

#[test]
fn cache_size_must_be_from_256kib_to_1gib() {
    only_problem(
        &plain("", "[store]\ncache_size = \"255KiB\""),
        "store.cache_size",
    );
    only_problem(
        &plain("", "[store]\ncache_size = \"2GiB\""),
        "store.cache_size",
    );
    valid(&plain("", "[store]\ncache_size = \"1GiB\""));
}

#[test]
fn when_full_accepts_drop_oldest_or_reject_and_suggests() {
    let message = only_problem(
        &plain("", "[store]\nwhen_full = \"drop_oldest\""),
        "store.when_full",
    );
    assert_eq!(
        message,
        "expected \"drop-oldest\" or \"reject\", found \"drop_oldest\" (did you mean \
             \"drop-oldest\"?)"
    );
}

#[test]
fn store_path_that_is_a_directory_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let text = plain("", &format!("[store]\npath = \"{}\"", dir.path().display()));
    let message = only_problem(&text, "store.path");
    assert!(message.contains("found the directory"), "{message}");
    only_problem(
        &plain("", "[store]\npath = \"/var/lib/edgesync/\""),
        "store.path",
    );
    only_problem(&plain("", "[store]\npath = \"\""), "store.path");
}

#[test]
fn store_path_below_a_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "").unwrap();
    let text = plain(
        "",
        &format!("[store]\npath = \"{}/file/q.redb\"", dir.path().display()),
    );
    let message = only_problem(&text, "store.path");
    assert!(message.contains("is not a directory"), "{message}");
}

// --- sync ------------------------------------------------------------------------------

#[test]
fn batch_max_bytes_too_small_for_the_largest_change_is_rejected_with_the_reason() {
    let message = only_problem(
        &plain("", "[sync]\nbatch_max_bytes = \"64KiB\""),
        "sync.batch_max_bytes",
    );
    assert!(
        message.starts_with("expected at least 65KiB (66560 bytes), found 64KiB (65536 bytes)"),
        "{message}"
    );
    assert!(
        message.contains("largest change the agent accepts"),
        "{message}"
    );
    valid(&plain("", "[sync]\nbatch_max_bytes = \"65KiB\""));
}

#[test]
fn batch_max_bytes_above_256mib_is_rejected() {
    valid(&plain("", "[sync]\nbatch_max_bytes = \"256MiB\""));
    let message = only_problem(
        &plain("", "[sync]\nbatch_max_bytes = 268435457"),
        "sync.batch_max_bytes",
    );
    assert!(message.starts_with("expected at most 256MiB"), "{message}");
}

#[test]
fn sync_limits_are_enforced() {
    for (line, key) in [
        ("batch_max_changes = 0", "sync.batch_max_changes"),
        ("batch_max_changes = 100001", "sync.batch_max_changes"),
        ("max_inflight = 0", "sync.max_inflight"),
        ("max_inflight = 1025", "sync.max_inflight"),
        ("linger = \"11s\"", "sync.linger"),
        ("encoding = \"JSON\"", "sync.encoding"),
        ("compression = \"deflate\"", "sync.compression"),
    ] {
        only_problem(&plain("", &format!("[sync]\n{line}")), key);
    }
    let config = valid(&plain(
        "",
        "[sync]\nbatch_max_changes = 100000\nmax_inflight = 1024\nlinger = \"10s\"",
    ));
    assert_eq!(config.sync.batch_max_changes, 100_000);
    assert_eq!(config.sync.max_inflight, 1024);
    assert_eq!(config.sync.linger, Duration::from_secs(10));
}

// --- local, log ------------------------------------------------------------------------

#[test]
fn socket_path_longer_than_sun_path_allows_is_rejected() {
    let long = format!("/run/{}.sock", "s".repeat(95));
    assert_eq!(long.len(), 105);
    let message = only_problem(
        &plain("", &format!("[local]\nsocket = {long:?}")),
        "local.socket",
    );
    assert!(message.contains("at most 100 bytes"), "{message}");
    assert!(message.contains("sun_path"), "{message}");
    let just_fits = format!("/run/{}.sock", "s".repeat(90));
    assert_eq!(just_fits.len(), 100);
    valid(&plain("", &format!("[local]\nsocket = {just_fits:?}")));
}

#[test]
fn relative_socket_path_is_rejected() {
    let message = only_problem(
        &plain("", "[local]\nsocket = \"edgesync.sock\""),
        "local.socket",
    );
    assert!(message.contains("absolute"), "{message}");
    only_problem(&plain("", "[local]\nsocket = \"\""), "local.socket");
}

#[test]
fn log_level_accepts_levels_and_target_directives() {
    for level in [
        "trace",
        "DEBUG",
        "info",
        "warn",
        "error",
        "off",
        "info,edgesync=debug",
        "edgesync::store=trace,rumqttc=warn",
    ] {
        assert_eq!(
            valid(&plain("", &format!("[log]\nlevel = {level:?}")))
                .log
                .level,
            level
        );
    }
    for level in [
        "",
        "verbose",
        "infoo",
        "info,",
        "=debug",
        "a=b=c",
        "edgesync[span]=debug",
        "info warn",
    ] {
        only_problem(
            &plain("", &format!("[log]\nlevel = {level:?}")),
            "log.level",
        );
    }
    let message = only_problem(&plain("", "[log]\nlevel = \"infoo\""), "log.level");
    assert!(message.contains("did you mean \"info\"?"), "{message}");
}

// --- desired ---------------------------------------------------------------------------

/// The `[desired]` configuration of a valid file with `rest` after `[mqtt]`.
fn desired(rest: &str) -> DesiredConfig {
    valid(&plain("", rest)).desired
}

/// The only problem of a file with `rest` after `[mqtt]`, which must be for `key`.
fn desired_problem(rest: &str, key: &str) -> String {
    only_problem(&plain("", rest), key)
}

fn glob(pattern: &str) -> KeyGlob {
    KeyGlob::new(pattern).unwrap()
}

#[test]
fn desired_defaults_apply_without_the_section_or_with_an_empty_one() {
    assert_eq!(desired(""), DesiredConfig::default());
    assert_eq!(desired("[desired]"), DesiredConfig::default());
    let defaults = DesiredConfig::default();
    assert_eq!(defaults.max_document_bytes, 256 * KIB);
    assert_eq!(defaults.max_depth, 16);
    assert_eq!(defaults.unknown_keys, UnknownKeys::Accept);
    assert_eq!(defaults.history, 10);
    assert_eq!(defaults.concurrency, 4);
    assert_eq!(defaults.handler_timeout, Duration::from_secs(30));
    assert_eq!(defaults.max_future_ts, Duration::from_secs(3600));
}

#[test]
fn desired_max_future_ts_is_a_bounded_duration() {
    assert_eq!(
        desired("[desired]\nmax_future_ts = \"5m\"").max_future_ts,
        Duration::from_secs(300)
    );
    for bad in ["\"0s\"", "\"31d\"", "\"soon\"", "5"] {
        let text = plain("", &format!("[desired]\nmax_future_ts = {bad}"));
        only_problem(&text, "desired.max_future_ts");
    }
}

#[test]
fn desired_full_valid_example() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgesync.toml");
    let text = plain(
        "",
        r#"
[desired]
max_document_bytes = "1MiB"
max_depth = 8
unknown_keys = "reject"
history = 0
concurrency = 2
handler_timeout = "5s"

[[desired.rule]]
keys = "setpoint"
type = "number"
min = -10
max = 30.5
nullable = false

[[desired.rule]]
keys = "led.mode"
type = "string"
enum = ["off", "blink"]
max_length = 8

[[desired.rule]]
keys = "level"
type = "integer"
enum = [1, 2.0, 3]

[[desired.rule]]
keys = "config.*"
enum = [{ a = [1, true] }, "x"]

[[desired.rule]]
keys = "*"

[[desired.conflict]]
keys = "led.*"
policy = "device-wins"

[[desired.conflict]]
keys = "schedule"
policy = "merge"
command = ["merge-schedule"]

[[desired.conflict]]
keys = "sched?"
policy = "merge"
command = ["/usr/bin/merge", "{key}"]
timeout = "1h"

[[desired.conflict]]
keys = "setpoint"
policy = "last-write-wins"

[[desired.conflict]]
keys = "x"
policy = "cloud-wins"

[[desired.handler]]
keys = "setpoint"
type = "exec"
command = ["/usr/local/bin/set", "--value", "{value}"]

[[desired.handler]]
keys = "led.*"
type = "exec"
command = ["led-ctl"]
timeout = "100ms"

[[desired.handler]]
keys = "display.*"
type = "file"
path = "out/{key}.json"

[[desired.handler]]
keys = "motd"
type = "file"
path = "/run/motd"

[[desired.handler]]
keys = "fan.*"
type = "watch"

[[desired.handler]]
keys = "pump.*"
type = "watch"
deadline = "2s"
"#,
    );
    let config = Config::from_toml_str(&file, &text).unwrap_or_else(|err| panic!("{err}"));
    let d = config.desired;
    assert_eq!(d.max_document_bytes, MIB);
    assert_eq!(d.max_depth, 8);
    assert_eq!(d.unknown_keys, UnknownKeys::Reject);
    assert_eq!(d.history, 0);
    assert_eq!(d.concurrency, 2);
    assert_eq!(d.handler_timeout, Duration::from_secs(5));

    let any = Rule {
        keys: glob("*"),
        value_type: None,
        min: None,
        max: None,
        one_of: None,
        max_length: None,
        nullable: true,
    };
    assert_eq!(
        d.rules,
        [
            Rule {
                keys: glob("setpoint"),
                value_type: Some(ValueType::Number),
                min: Some(-10.0),
                max: Some(30.5),
                nullable: false,
                ..any.clone()
            },
            Rule {
                keys: glob("led.mode"),
                value_type: Some(ValueType::String),
                one_of: Some(vec![serde_json::json!("off"), serde_json::json!("blink")]),
                max_length: Some(8),
                ..any.clone()
            },
            Rule {
                keys: glob("level"),
                value_type: Some(ValueType::Integer),
                one_of: Some(vec![
                    serde_json::json!(1),
                    serde_json::json!(2.0),
                    serde_json::json!(3)
                ]),
                ..any.clone()
            },
            Rule {
                keys: glob("config.*"),
                one_of: Some(vec![
                    serde_json::json!({"a": [1, true]}),
                    serde_json::json!("x")
                ]),
                ..any.clone()
            },
            any,
        ]
    );

    assert_eq!(
        d.conflicts,
        [
            ConflictRule {
                keys: glob("led.*"),
                policy: Policy::DeviceWins
            },
            ConflictRule {
                keys: glob("schedule"),
                policy: Policy::Merge {
                    argv: vec!["merge-schedule".to_owned()],
                    timeout: Duration::from_secs(5)
                }
            },
            ConflictRule {
                keys: glob("sched?"),
                policy: Policy::Merge {
                    argv: vec!["/usr/bin/merge".to_owned(), "{key}".to_owned()],
                    timeout: Duration::from_secs(3600)
                }
            },
            ConflictRule {
                keys: glob("setpoint"),
                policy: Policy::LastWriteWins
            },
            ConflictRule {
                keys: glob("x"),
                policy: Policy::CloudWins
            },
        ]
    );

    let handler = |keys: &str, kind| Handler {
        keys: glob(keys),
        kind,
    };
    assert_eq!(
        d.handlers,
        [
            handler(
                "setpoint",
                HandlerKind::Exec {
                    argv: vec![
                        "/usr/local/bin/set".to_owned(),
                        "--value".to_owned(),
                        "{value}".to_owned()
                    ],
                    timeout: Duration::from_secs(5)
                }
            ),
            handler(
                "led.*",
                HandlerKind::Exec {
                    argv: vec!["led-ctl".to_owned()],
                    timeout: Duration::from_millis(100)
                }
            ),
            // Relative paths are resolved against the config file's directory.
            handler(
                "display.*",
                HandlerKind::File {
                    path: dir.path().join("out/{key}.json")
                }
            ),
            handler(
                "motd",
                HandlerKind::File {
                    path: PathBuf::from("/run/motd")
                }
            ),
            handler(
                "fan.*",
                HandlerKind::Watch {
                    deadline: Duration::from_secs(5)
                }
            ),
            handler(
                "pump.*",
                HandlerKind::Watch {
                    deadline: Duration::from_secs(2)
                }
            ),
        ]
    );
}

#[test]
fn desired_limits_are_enforced() {
    for (line, key, message) in [
        (
            "max_document_bytes = \"1023B\"",
            "desired.max_document_bytes",
            "expected at least 1KiB (1024 bytes), found 1023 bytes",
        ),
        (
            "max_document_bytes = \"17MiB\"",
            "desired.max_document_bytes",
            "expected at most 16MiB (16777216 bytes), found 17MiB (17825792 bytes)",
        ),
        (
            "max_document_bytes = \"big\"",
            "desired.max_document_bytes",
            "expected a size such as",
        ),
        (
            "max_depth = 0",
            "desired.max_depth",
            "expected 1 to 64, found 0",
        ),
        (
            "max_depth = 65",
            "desired.max_depth",
            "expected 1 to 64, found 65",
        ),
        (
            "history = -1",
            "desired.history",
            "expected 0 to 1000, found -1",
        ),
        (
            "history = 1001",
            "desired.history",
            "expected 0 to 1000, found 1001",
        ),
        (
            "concurrency = 0",
            "desired.concurrency",
            "expected 1 to 64, found 0",
        ),
        (
            "concurrency = 65",
            "desired.concurrency",
            "expected 1 to 64, found 65",
        ),
        (
            "concurrency = \"4\"",
            "desired.concurrency",
            "expected an integer, found a string \"4\"",
        ),
        (
            "handler_timeout = \"99ms\"",
            "desired.handler_timeout",
            "expected a duration from 100ms to 1h, found 99ms",
        ),
        (
            "handler_timeout = \"2h\"",
            "desired.handler_timeout",
            "expected a duration from 100ms to 1h, found 7200s",
        ),
        (
            "handler_timeout = 30",
            "desired.handler_timeout",
            "expected a duration string such as \"30s\", found an integer 30",
        ),
        (
            "unknown_keys = \"rejct\"",
            "desired.unknown_keys",
            "expected \"accept\" or \"reject\", found \"rejct\" (did you mean \"reject\"?)",
        ),
    ] {
        let found = desired_problem(&format!("[desired]\n{line}"), key);
        assert!(found.starts_with(message), "{line}: {found}");
    }
    let d = desired(
        "[desired]\nmax_document_bytes = 1024\nmax_depth = 64\nhistory = 1000\n\
             concurrency = 64\nhandler_timeout = \"100ms\"\nunknown_keys = \"accept\"",
    );
    assert_eq!(
        (d.max_document_bytes, d.max_depth, d.history, d.concurrency),
        (1024, 64, 1000, 64)
    );
    assert_eq!(d.handler_timeout, Duration::from_millis(100));
    let d = desired("[desired]\nmax_document_bytes = \"16MiB\"\nhandler_timeout = \"1h\"");
    assert_eq!(d.max_document_bytes, 16 * MIB);
    assert_eq!(d.handler_timeout, Duration::from_secs(3600));
}

#[test]
fn desired_unknown_keys_are_reported_with_suggestions() {
    let message = desired_problem(
        "[desired]\nhandler_timout = \"1s\"",
        "desired.handler_timout",
    );
    assert!(
        message.starts_with("unknown key (did you mean \"handler_timeout\"?)"),
        "{message}"
    );
    assert!(
        message.ends_with(
            "expected one of max_document_bytes, max_depth, unknown_keys, history, \
                 concurrency, handler_timeout, max_future_ts, rule, conflict, handler"
        ),
        "{message}"
    );
    // In an entry of an array of tables: did-you-mean, or where the key belongs.
    let message = desired_problem(
        "[[desired.rule]]\nkeys = \"a\"\nmaxlength = 3",
        "desired.rule[1].maxlength",
    );
    assert_eq!(
        message,
        "unknown key (did you mean \"max_length\"?); expected one of keys, type, min, max, \
             enum, max_length, nullable"
    );
    let message = desired_problem(
        "[[desired.rule]]\nkeys = \"a\"\npolicy = \"merge\"",
        "desired.rule[1].policy",
    );
    assert!(
        message.contains("(it belongs in [[desired.conflict]])"),
        "{message}"
    );
    let message = desired_problem(
        "[[desired.handler]]\nkeys = \"a\"\ntype = \"watch\"\nconcurrency = 2",
        "desired.handler[1].concurrency",
    );
    assert!(message.contains("(it belongs in [desired])"), "{message}");
    let message = desired_problem(
        "[[desired.conflict]]\nkeys = \"a\"\npolicy = \"device-wins\"\nnullable = true",
        "desired.conflict[1].nullable",
    );
    assert!(
        message.contains("(it belongs in [[desired.rule]])"),
        "{message}"
    );
    // An array of tables of an unknown name.
    let message = desired_problem("[[desired.rules]]\nkeys = \"a\"", "desired.rules");
    assert!(message.contains("did you mean \"rule\"?"), "{message}");
}

#[test]
fn desired_tables_must_be_arrays_of_tables() {
    let message = desired_problem("[desired.rule]\nkeys = \"a\"", "desired.rule");
    assert_eq!(
        message,
        "expected an array of tables [[desired.rule]], found a table (write \
             [[desired.rule]], with double brackets, once per entry)"
    );
    let message = desired_problem("[desired]\nhandler = \"exec\"", "desired.handler");
    assert_eq!(
        message,
        "expected an array of tables [[desired.handler]], found a string \"exec\""
    );
    // An entry that is not a table keeps the numbering of the others.
    let found = problems(&plain(
        "",
        "[desired]\nrule = [1, { keys = \"a\", min = \"x\" }]",
    ));
    assert_eq!(
        keys(&found),
        ["desired.rule[1]", "desired.rule[2].min"],
        "{found:#?}"
    );
    assert_eq!(
        found[0].message,
        "expected a table [[desired.rule]], found an integer 1"
    );
    let message = only_problem(&format!("desired = 1\n{}", plain("", "")), "desired");
    assert_eq!(message, "expected a table [desired], found an integer 1");
}

#[test]
fn desired_tables_have_a_limit() {
    let mut text = String::new();
    for i in 0..1001 {
        text.push_str(&format!("[[desired.rule]]\nkeys = \"k{i}\"\n"));
    }
    let message = desired_problem(&text, "desired.rule");
    assert_eq!(
        message,
        "expected at most 1000 [[desired.rule]] tables, found 1001"
    );
    let mut text = String::new();
    for i in 0..1000 {
        text.push_str(&format!(
            "[[desired.handler]]\nkeys = \"k{i}\"\ntype = \"watch\"\n"
        ));
    }
    assert_eq!(desired(&text).handlers.len(), 1000);
}

#[test]
fn desired_rule_keys_is_a_required_glob() {
    let message = desired_problem("[[desired.rule]]\ntype = \"bool\"", "desired.rule[1].keys");
    assert!(message.starts_with("missing required key; expected a key glob"));
    let message = desired_problem("[[desired.rule]]\nkeys = \"led/*\"", "desired.rule[1].keys");
    assert_eq!(
        message,
        "expected a key glob of 1-128 characters of [A-Za-z0-9_.-] and the wildcards * and \
             ?, found \"led/*\" ('/' at byte 3 is not allowed)"
    );
    desired_problem("[[desired.rule]]\nkeys = \"\"", "desired.rule[1].keys");
    desired_problem(
        &format!("[[desired.rule]]\nkeys = \"{}\"", "a".repeat(129)),
        "desired.rule[1].keys",
    );
    let message = desired_problem("[[desired.rule]]\nkeys = [\"a\"]", "desired.rule[1].keys");
    assert_eq!(message, "expected a string, found an array");
}

#[test]
fn desired_rule_type_names_the_allowed_types() {
    let message = desired_problem(
        "[[desired.rule]]\nkeys = \"a\"\ntype = \"boolean\"",
        "desired.rule[1].type",
    );
    assert_eq!(
        message,
        "expected \"bool\" or \"integer\" or \"number\" or \"string\" or \"object\" or \
             \"array\", found \"boolean\" (did you mean \"bool\"?)"
    );
    for (written, meant) in [("int", "integer"), ("float", "number"), ("strin", "string")] {
        let message = desired_problem(
            &format!("[[desired.rule]]\nkeys = \"a\"\ntype = {written:?}"),
            "desired.rule[1].type",
        );
        assert!(
            message.ends_with(&format!("(did you mean {meant:?}?)")),
            "{message}"
        );
    }
}

#[test]
fn desired_rule_bounds_are_numbers_in_order_and_only_for_numbers() {
    let message = desired_problem(
        "[[desired.rule]]\nkeys = \"a\"\nmin = 10\nmax = 9.5",
        "desired.rule[1].max",
    );
    assert_eq!(
        message,
        "must not be below desired.rule[1].min (10), found 9.5"
    );
    let message = desired_problem(
        "[[desired.rule]]\nkeys = \"a\"\nmin = \"5\"",
        "desired.rule[1].min",
    );
    assert_eq!(message, "expected a number, found a string \"5\"");
    let message = desired_problem(
        "[[desired.rule]]\nkeys = \"a\"\nmax = nan",
        "desired.rule[1].max",
    );
    assert_eq!(message, "expected a finite number, found NaN");
    desired_problem(
        "[[desired.rule]]\nkeys = \"a\"\nmin = -inf",
        "desired.rule[1].min",
    );
    for value_type in ["string", "bool", "object", "array"] {
        let found = problems(&plain(
            "",
            &format!("[[desired.rule]]\nkeys = \"a\"\ntype = \"{value_type}\"\nmin = 1\nmax = 2"),
        ));
        assert_eq!(
            keys(&found),
            ["desired.rule[1].min", "desired.rule[1].max"],
            "{found:#?}"
        );
        assert_eq!(
            found[0].message,
            format!(
                "min applies to numbers only, but desired.rule[1].type = \"{value_type}\"; \
                     remove it (max_length limits the length of strings, arrays and objects)"
            )
        );
    }
    // Equal bounds and bounds with no type are fine.
    let d = desired("[[desired.rule]]\nkeys = \"a\"\nmin = 3\nmax = 3.0");
    assert_eq!((d.rules[0].min, d.rules[0].max), (Some(3.0), Some(3.0)));
    assert_eq!(d.rules[0].value_type, None);
    let d = desired("[[desired.rule]]\nkeys = \"a\"\ntype = \"integer\"\nmin = 0");
    assert_eq!(d.rules[0].min, Some(0.0));
}

#[test]
fn desired_rule_max_length_is_for_strings_arrays_and_objects() {
    let message = desired_problem(
        "[[desired.rule]]\nkeys = \"a\"\nmax_length = -1",
        "desired.rule[1].max_length",
    );
    assert_eq!(message, "expected an integer of 0 or more, found -1");
    let message = desired_problem(
        "[[desired.rule]]\nkeys = \"a\"\nmax_length = 2.5",
        "desired.rule[1].max_length",
    );
    assert_eq!(message, "expected an integer, found a float 2.5");
    for value_type in ["bool", "integer", "number"] {
        let message = desired_problem(
            &format!("[[desired.rule]]\nkeys = \"a\"\ntype = \"{value_type}\"\nmax_length = 3"),
            "desired.rule[1].max_length",
        );
        assert!(
            message.starts_with("max_length applies to strings, arrays and objects only"),
            "{message}"
        );
    }
    for value_type in ["string", "array", "object"] {
        let d = desired(&format!(
            "[[desired.rule]]\nkeys = \"a\"\ntype = \"{value_type}\"\nmax_length = 0"
        ));
        assert_eq!(d.rules[0].max_length, Some(0));
    }
}

#[test]
fn desired_rule_enum_is_a_non_empty_list_of_settable_values() {
    let message = desired_problem(
        "[[desired.rule]]\nkeys = \"a\"\nenum = []",
        "desired.rule[1].enum",
    );
    assert_eq!(
        message,
        "expected at least one allowed value, found an empty array"
    );
    let message = desired_problem(
        "[[desired.rule]]\nkeys = \"a\"\nenum = \"eco\"",
        "desired.rule[1].enum",
    );
    assert_eq!(
        message,
        "expected an array of the allowed values, found a string \"eco\""
    );
    let message = desired_problem(
        "[[desired.rule]]\nkeys = \"a\"\nenum = [\"x\", 1979-05-27]",
        "desired.rule[1].enum",
    );
    assert_eq!(
        message,
        "item 2: the datetime 1979-05-27 has no JSON form; write it as a string, \
             \"1979-05-27\""
    );
    let message = desired_problem(
        "[[desired.rule]]\nkeys = \"a\"\nenum = [1, [nan]]",
        "desired.rule[1].enum",
    );
    assert_eq!(
        message,
        "item 2: NaN has no JSON form (expected a finite number)"
    );
    // Values the rest of the rule refuses.
    let found = problems(&plain(
        "",
        "[[desired.rule]]\nkeys = \"a\"\ntype = \"integer\"\nmax = 10\n\
             enum = [1, \"2\", 2.5, 11]",
    ));
    assert_eq!(
        found.iter().map(|p| p.message.as_str()).collect::<Vec<_>>(),
        [
            "item 2 can never be set, the rest of this rule refuses it: expected an \
                 integer, found a string",
            "item 3 can never be set, the rest of this rule refuses it: expected an \
                 integer, found the number 2.5 (it has a fractional part)",
            "item 4 can never be set, the rest of this rule refuses it: 11 is above the \
                 maximum 10",
        ]
    );
    assert_eq!(keys(&found), ["desired.rule[1].enum"; 3], "{found:#?}");
    let message = desired_problem(
        "[[desired.rule]]\nkeys = \"a\"\nmax_length = 3\nenum = [\"abcd\"]",
        "desired.rule[1].enum",
    );
    assert!(
        message.ends_with("string of 4 characters is longer than 3"),
        "{message}"
    );
}

#[test]
fn desired_rule_nullable_is_a_boolean() {
    assert!(desired("[[desired.rule]]\nkeys = \"a\"").rules[0].nullable);
    assert!(!desired("[[desired.rule]]\nkeys = \"a\"\nnullable = false").rules[0].nullable);
    let message = desired_problem(
        "[[desired.rule]]\nkeys = \"a\"\nnullable = \"no\"",
        "desired.rule[1].nullable",
    );
    assert_eq!(message, "expected true or false, found a string \"no\"");
}

#[test]
fn desired_rules_are_validated_in_turn_and_named_by_their_number() {
    let mut text = String::new();
    for i in 1..=11 {
        let extra = match i {
            2 => "max = \"x\"\n",
            5 => "type = \"str\"\n",
            10 => "bogus = 1\nmin = 2\nmax = 1\n",
            _ => "",
        };
        text.push_str(&format!("[[desired.rule]]\nkeys = \"k{i}\"\n{extra}"));
    }
    // Problems from both stages, in file order (rule 10 after rule 2, the unknown key
    // after the known ones).
    let found = problems(&plain(
        "",
        &format!("[[desired.conflict]]\nkeys = \"a\"\n{text}"),
    ));
    assert_eq!(
        keys(&found),
        [
            "desired.rule[2].max",
            "desired.rule[5].type",
            "desired.rule[10].max",
            "desired.rule[10].bogus",
            "desired.conflict[1].policy",
        ],
        "{found:#?}"
    );
}

#[test]
fn desired_entries_that_are_never_used_are_reported() {
    let message = desired_problem(
        "[[desired.rule]]\nkeys = \"led.*\"\n[[desired.rule]]\nkeys = \"a\"\n\
             [[desired.rule]]\nkeys = \"led.*\"\ntype = \"string\"",
        "desired.rule[3].keys",
    );
    assert_eq!(
        message,
        "this entry is never used: desired.rule[1] (keys = \"led.*\") has the same keys and \
             comes first (the first match wins)"
    );
    let message = desired_problem(
        "[[desired.handler]]\nkeys = \"**\"\ntype = \"watch\"\n\
             [[desired.handler]]\nkeys = \"a\"\ntype = \"watch\"",
        "desired.handler[2].keys",
    );
    assert!(message.contains("matches every key"), "{message}");
    let message = desired_problem(
        "[[desired.conflict]]\nkeys = \"a\"\npolicy = \"device-wins\"\n\
             [[desired.conflict]]\nkeys = \"a\"\npolicy = \"cloud-wins\"",
        "desired.conflict[2].keys",
    );
    assert!(message.contains("desired.conflict[1]"), "{message}");
    // A catch-all last is the usual way to end a list.
    desired("[[desired.rule]]\nkeys = \"a\"\n[[desired.rule]]\nkeys = \"*\"");
}

#[test]
fn desired_conflict_policy_is_required_and_checked() {
    let message = desired_problem(
        "[[desired.conflict]]\nkeys = \"a\"",
        "desired.conflict[1].policy",
    );
    assert_eq!(
        message,
        "missing required key; expected \"cloud-wins\", \"device-wins\", \
             \"last-write-wins\" or \"merge\""
    );
    let message = desired_problem(
        "[[desired.conflict]]\nkeys = \"a\"\npolicy = \"cloud_wins\"",
        "desired.conflict[1].policy",
    );
    assert!(
        message.ends_with("(did you mean \"cloud-wins\"?)"),
        "{message}"
    );
    desired_problem(
        "[[desired.conflict]]\npolicy = \"merge\"\ncommand = [\"m\"]",
        "desired.conflict[1].keys",
    );
}

#[test]
fn desired_conflict_command_and_timeout_go_with_merge_only() {
    let message = desired_problem(
        "[[desired.conflict]]\nkeys = \"a\"\npolicy = \"merge\"",
        "desired.conflict[1].command",
    );
    assert!(message.starts_with("missing required key; expected the merge program"));
    let found = problems(&plain(
        "",
        "[[desired.conflict]]\nkeys = \"a\"\npolicy = \"device-wins\"\n\
             command = [\"/bin/m\"]\ntimeout = \"1s\"",
    ));
    assert_eq!(
        keys(&found),
        ["desired.conflict[1].command", "desired.conflict[1].timeout"],
        "{found:#?}"
    );
    assert_eq!(
        found[0].message,
        "is only used with policy = \"merge\", but desired.conflict[1].policy = \
             \"device-wins\"; remove it"
    );
    let message = desired_problem(
        "[[desired.conflict]]\nkeys = \"a\"\npolicy = \"merge\"\ncommand = [\"m\"]\n\
             timeout = \"50ms\"",
        "desired.conflict[1].timeout",
    );
    assert_eq!(message, "expected a duration from 100ms to 1h, found 50ms");
    // The merge timeout defaults to desired.handler_timeout.
    let d = desired(
        "[desired]\nhandler_timeout = \"7s\"\n\
             [[desired.conflict]]\nkeys = \"a\"\npolicy = \"merge\"\ncommand = [\"m\"]",
    );
    assert_eq!(
        d.conflicts[0].policy,
        Policy::Merge {
            argv: vec!["m".to_owned()],
            timeout: Duration::from_secs(7)
        }
    );
}

#[test]
fn commands_are_a_program_and_its_arguments() {
    for (command, message) in [
        (
            "[]",
            "expected a program and its arguments such as [\"/usr/local/bin/apply\", \
                 \"{key}\"], found an empty array",
        ),
        (
            "[\"\"]",
            "expected a program and its arguments such as [\"/usr/local/bin/apply\", \
                 \"{key}\"], found an empty program name",
        ),
        (
            "[\"bin/merge\"]",
            "expected the program as an absolute path or a bare name looked up in PATH, \
                 found the relative path \"bin/merge\"",
        ),
        (
            "[\"./merge\"]",
            "expected the program as an absolute path or a bare name looked up in PATH, \
                 found the relative path \"./merge\"",
        ),
        (
            "[\"/bin/m\", \"a\\u0000b\"]",
            "expected a program and its arguments such as [\"/usr/local/bin/apply\", \
                 \"{key}\"], found NUL in item 2",
        ),
        (
            "[\"/bin/m\", 5]",
            "expected an array of strings such as [\"/usr/bin/prog\", \"--flag\"], found \
                 an array whose item 2 is an integer 5",
        ),
        (
            "\"/bin/m --flag\"",
            "expected an array of strings such as [\"/usr/bin/prog\", \"--flag\"], found a \
                 string \"/bin/m --flag\"",
        ),
    ] {
        let found = desired_problem(
            &format!("[[desired.conflict]]\nkeys = \"a\"\npolicy = \"merge\"\ncommand = {command}"),
            "desired.conflict[1].command",
        );
        assert_eq!(found, message, "{command}");
        let found = desired_problem(
            &format!("[[desired.handler]]\nkeys = \"a\"\ntype = \"exec\"\ncommand = {command}"),
            "desired.handler[1].command",
        );
        assert_eq!(found, message, "{command}");
    }
    // Empty arguments after the program are allowed.
    let d = desired("[[desired.handler]]\nkeys = \"a\"\ntype = \"exec\"\ncommand = [\"p\", \"\"]");
    assert!(matches!(&d.handlers[0].kind, HandlerKind::Exec { argv, .. } if argv.len() == 2));
}

#[test]
fn desired_handler_type_is_required_and_checked() {
    let message = desired_problem(
        "[[desired.handler]]\nkeys = \"a\"",
        "desired.handler[1].type",
    );
    assert!(
        message.starts_with("missing required key; expected \"exec\""),
        "{message}"
    );
    let message = desired_problem(
        "[[desired.handler]]\nkeys = \"a\"\ntype = \"exe\"",
        "desired.handler[1].type",
    );
    assert_eq!(
        message,
        "expected \"exec\" or \"file\" or \"watch\", found \"exe\" (did you mean \"exec\"?)"
    );
}

#[test]
fn desired_handler_keys_must_belong_to_its_type() {
    let found = problems(&plain(
        "",
        "[[desired.handler]]\nkeys = \"a\"\ntype = \"exec\"\ncommand = [\"p\"]\n\
             path = \"/x\"\ndeadline = \"1s\"\n\
             [[desired.handler]]\nkeys = \"b\"\ntype = \"file\"\npath = \"/x\"\ntimeout = \"1s\"\n\
             [[desired.handler]]\nkeys = \"c\"\ntype = \"watch\"\ncommand = [\"p\"]",
    ));
    assert_eq!(
        keys(&found),
        [
            "desired.handler[1].path",
            "desired.handler[1].deadline",
            "desired.handler[2].timeout",
            "desired.handler[3].command",
        ],
        "{found:#?}"
    );
    assert_eq!(
        found[0].message,
        "is not used by a handler of type = \"exec\" (it takes command and timeout); path is \
             for type = \"file\""
    );
    assert_eq!(
        found[2].message,
        "is not used by a handler of type = \"file\" (it takes path); timeout is for type = \
             \"exec\""
    );
    assert_eq!(
        found[3].message,
        "is not used by a handler of type = \"watch\" (it takes deadline); command is for \
             type = \"exec\""
    );
}

#[test]
fn desired_exec_handler_needs_a_command_and_takes_a_timeout() {
    let message = desired_problem(
        "[[desired.handler]]\nkeys = \"a\"\ntype = \"exec\"",
        "desired.handler[1].command",
    );
    assert!(message.starts_with("missing required key; expected the program"));
    let message = desired_problem(
        "[[desired.handler]]\nkeys = \"a\"\ntype = \"exec\"\ncommand = [\"p\"]\ntimeout = \"2h\"",
        "desired.handler[1].timeout",
    );
    assert_eq!(message, "expected a duration from 100ms to 1h, found 7200s");
}

#[test]
fn desired_file_handler_path_is_checked() {
    let message = desired_problem(
        "[[desired.handler]]\nkeys = \"a\"\ntype = \"file\"",
        "desired.handler[1].path",
    );
    assert!(message.starts_with("missing required key; expected the file to write"));
    for (path, message) in [
        ("", "expected a path, found an empty string"),
        (
            "/var/lib/app/",
            "expected the path of a file, found the directory \"/var/lib/app/\" (e.g. use \
                 \"/var/lib/app/{key}.json\")",
        ),
        (
            "/var/lib/{value}.json",
            "only the placeholder {key} is replaced in a path, found \"{value}\" in \
                 \"/var/lib/{value}.json\"",
        ),
        (
            "/var/lib/{key.json",
            "only the placeholder {key} is replaced in a path, found \"{\" in \
                 \"/var/lib/{key.json\"",
        ),
        (
            "/var/lib/a}.json",
            "only the placeholder {key} is replaced in a path, found \"}\" in \
                 \"/var/lib/a}.json\"",
        ),
    ] {
        let found = desired_problem(
            &format!("[[desired.handler]]\nkeys = \"a\"\ntype = \"file\"\npath = {path:?}"),
            "desired.handler[1].path",
        );
        assert_eq!(found, message, "{path:?}");
    }
    // A glob that can match several keys needs {key} in the path.
    let message = desired_problem(
        "[[desired.handler]]\nkeys = \"led.*\"\ntype = \"file\"\npath = \"/run/led.json\"",
        "desired.handler[1].path",
    );
    assert!(
        message.starts_with("keys = \"led.*\" can match several keys, but the path has no {key}"),
        "{message}"
    );
    let d = desired(
        "[[desired.handler]]\nkeys = \"led?\"\ntype = \"file\"\npath = \"/run/{key}/{key}.json\"",
    );
    assert_eq!(
        d.handlers[0].kind,
        HandlerKind::File {
            path: PathBuf::from("/run/{key}/{key}.json")
        }
    );
}

#[test]
fn desired_watch_deadline_defaults_to_the_handler_timeout() {
    let d = desired(
        "[desired]\nhandler_timeout = \"250ms\"\n\
             [[desired.handler]]\nkeys = \"a\"\ntype = \"watch\"\n\
             [[desired.handler]]\nkeys = \"b\"\ntype = \"exec\"\ncommand = [\"p\"]",
    );
    assert_eq!(
        d.handlers[0].kind,
        HandlerKind::Watch {
            deadline: Duration::from_millis(250)
        }
    );
    assert_eq!(
        d.handlers[1].kind,
        HandlerKind::Exec {
            argv: vec!["p".to_owned()],
            timeout: Duration::from_millis(250)
        }
    );
    let message = desired_problem(
        "[[desired.handler]]\nkeys = \"a\"\ntype = \"watch\"\ndeadline = \"0\"",
        "desired.handler[1].deadline",
    );
    assert_eq!(message, "expected a duration from 100ms to 1h, found 0ns");
}

#[test]
fn desired_problems_are_all_reported_even_with_a_bad_handler_timeout() {
    let found = problems(&plain(
        "",
        "[desired]\nhandler_timeout = \"forever\"\nunknown_keys = 1\n\
             [[desired.rule]]\nkeys = \"a\"\ntype = \"text\"\n\
             [[desired.conflict]]\nkeys = \"a\"\npolicy = \"merge\"\n\
             [[desired.handler]]\nkeys = \"a\"\ntype = \"exec\"\ncommand = [\"p\"]\n\
             [[desired.handler]]\nkeys = \"b\"\ntype = \"watch\"\ndeadline = \"5h\"",
    ));
    assert_eq!(
        keys(&found),
        [
            "desired.unknown_keys",
            "desired.handler_timeout",
            "desired.rule[1].type",
            "desired.conflict[1].command",
            "desired.handler[2].deadline",
        ],
        "{found:#?}"
    );
}

#[test]
fn syntax_error_in_an_array_of_tables_names_the_entry() {
    let text = plain(
        "",
        "[[desired.rule]]\nkeys = \"a\"\n\n[[desired.rule]]\nkeys = \"b\"\nmin = 5x\n",
    );
    let found = problems(&text);
    assert_eq!(keys(&found), ["desired.rule[2].min"], "{found:#?}");
    assert!(found[0].message.starts_with("TOML syntax error at line"));
    let found = problems(&plain(
        "",
        "[[desired.rule]]\nkeys = \"a\"\n[[ desired.handler ]]\ntype = exec\n",
    ));
    assert_eq!(keys(&found), ["desired.handler[1].type"], "{found:#?}");
}

// --- the report ------------------------------------------------------------------------

#[test]
fn every_problem_is_reported_together() {
    let text = "[device]\nid = \"bad id\"\n\
                    [mqtt]\nurl = \"mqtt://b\"\nkeepalive = \"30s\"\ncert = \"/nonexistent/d.pem\"\n\
                    [store]\nmax_bytes = \"lots\"\nwhen_full = \"never\"\n\
                    [sync]\nbatch_max_changes = \"10\"\nbatch_max_bytes = \"1KiB\"\nlinger = \"1 fortnight\"\n\
                    [local]\nsocket = \"rel.sock\"\n\
                    [log]\nlevel = \"\"\n\
                    [desired]\nmax_depth = 0\n\
                    [[desired.rule]]\nkeys = \"a b\"\n\
                    [[desired.handler]]\nkeys = \"a\"\ntype = \"exec\"\npath = \"/x\"\n";
    let problems = problems(text);
    assert_eq!(
        keys(&problems),
        [
            "device.id",
            "mqtt.url",
            "mqtt.cert",
            "mqtt.keepalive",
            "store.max_bytes",
            "store.when_full",
            "sync.batch_max_changes",
            "sync.batch_max_bytes",
            "sync.linger",
            "local.socket",
            "log.level",
            "desired.max_depth",
            "desired.rule[1].keys",
            "desired.handler[1].command",
            "desired.handler[1].path",
        ],
        "{problems:#?}"
    );
}

#[test]
fn report_prints_one_line_per_problem_with_file_and_key() {
    let errors = parse("[device]\nid = \"a b\"\n[mqtt]\nurl = \"mqtt://b\"\n").unwrap_err();
    assert_eq!(errors.file, Path::new(FILE));
    let shown = errors.to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 2, "{shown}");
    assert!(lines[0].starts_with("/test/edgesync.toml: device.id: expected 1-64"));
    assert_eq!(
        lines[1],
        "/test/edgesync.toml: mqtt.url: \"mqtt://\" is plaintext; set \
             mqtt.allow_plaintext = true to allow it, or use mqtts://"
    );
}

#[test]
fn unreadable_file_is_a_file_level_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("missing.toml");
    let errors = Config::load(&file).unwrap_err();
    assert_eq!(keys(&errors.problems), [""]);
    assert_eq!(
        errors.to_string(),
        format!(
            "{}: cannot read: No such file or directory (os error 2)",
            file.display()
        )
    );
}

#[test]
fn file_that_is_not_utf8_is_a_file_level_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("e.toml");
    std::fs::write(&file, b"[device]\nid = \"\xff\"\n").unwrap();
    let errors = Config::load(&file).unwrap_err();
    assert_eq!(keys(&errors.problems), [""]);
    assert!(errors.problems[0].message.contains("not UTF-8"), "{errors}");
}

#[test]
fn syntax_error_reports_line_column_and_key() {
    let text = "[device]\nid = \"d\"\n\n[mqtt]\nurl = \"mqtts://b\"\nkeep_alive = 30s\n";
    let found = problems(text);
    assert_eq!(keys(&found), ["mqtt.keep_alive"], "{found:#?}");
    assert!(
        found[0]
            .message
            .starts_with("TOML syntax error at line 6, column "),
        "{found:#?}"
    );

    let found = problems("[device\nid = 1\n");
    assert_eq!(keys(&found), [""], "{found:#?}");
    assert!(found[0].message.contains("line 1"), "{found:#?}");

    let found = problems("[device]\nid = \"a\"\nid = \"b\"\n");
    assert_eq!(keys(&found), ["device.id"], "{found:#?}");
    assert!(found[0].message.contains("line 3"), "{found:#?}");
}

// --- durations and sizes ---------------------------------------------------------------

#[test]
fn local_timeouts_have_defaults_and_bounds() {
    let base = "[device]\nid = \"d\"\n[mqtt]\nurl = \"mqtts://h:8883\"\nca = \"/dev/null\"\n";
    let c = Config::from_toml_str(Path::new("/etc/edgesync/e.toml"), base).unwrap();
    assert_eq!(c.local.idle_timeout, DEFAULT_IDLE_TIMEOUT);
    assert_eq!(c.local.client_timeout, DEFAULT_CLIENT_TIMEOUT);
    let text = format!("{base}[local]\nidle_timeout = \"2s\"\nclient_timeout = \"500ms\"\n");
    let c = Config::from_toml_str(Path::new("/etc/edgesync/e.toml"), &text).unwrap();
    assert_eq!(c.local.idle_timeout, Duration::from_secs(2));
    assert_eq!(c.local.client_timeout, Duration::from_millis(500));
    let text = format!("{base}[local]\nidle_timeout = \"500ms\"\nclient_timeout = \"2h\"\n");
    let e = Config::from_toml_str(Path::new("/etc/edgesync/e.toml"), &text).unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("local.idle_timeout") && e.contains("from 1s to 1d"),
        "{e}"
    );
    assert!(e.contains("local.client_timeout"), "{e}");
}

#[test]
fn parse_duration_accepts_whole_numbers_with_units() {
    for (text, expected) in [
        ("0", Duration::ZERO),
        ("0s", Duration::ZERO),
        ("0ms", Duration::ZERO),
        ("250ms", Duration::from_millis(250)),
        ("30s", Duration::from_secs(30)),
        ("5m", Duration::from_secs(300)),
        ("1h", Duration::from_secs(3600)),
        ("2d", Duration::from_secs(2 * 86400)),
        (" 30 s ", Duration::from_secs(30)),
        ("007s", Duration::from_secs(7)),
    ] {
        assert_eq!(parse_duration(text), Ok(expected), "{text:?}");
    }
}

#[test]
fn parse_duration_rejects_junk_negative_fractions_and_overflow() {
    for text in [
        "",
        " ",
        "30",
        "s",
        "-5s",
        "+5s",
        "1.5s",
        "30sec",
        "30S",
        "5 m 3s",
        "1m30s",
        "ms",
        "99999999999999999999s",
        "18446744073709551615d",
        "213503982334602d",
    ] {
        assert!(parse_duration(text).is_err(), "{text:?} was accepted");
    }
    assert!(parse_duration("-5s").unwrap_err().contains("negative"));
    assert!(parse_duration("1.5s").unwrap_err().contains("whole number"));
    assert!(
        parse_duration("213503982334602d")
            .unwrap_err()
            .contains("too large")
    );
}

#[test]
fn parse_size_accepts_binary_and_decimal_units() {
    for (text, expected) in [
        ("0", 0),
        ("512", 512),
        ("100B", 100),
        ("64KiB", 64 * 1024),
        ("256MiB", 256 * 1024 * 1024),
        ("1GiB", 1 << 30),
        ("2TiB", 2 << 40),
        ("64KB", 64_000),
        ("256MB", 256_000_000),
        ("1GB", 1_000_000_000),
        ("3TB", 3_000_000_000_000),
        ("64kib", 64 * 1024),
        (" 1 MiB ", 1 << 20),
        ("18446744073709551615", u64::MAX),
    ] {
        assert_eq!(parse_size(text), Ok(expected), "{text:?}");
    }
}

#[test]
fn parse_size_rejects_junk_negative_fractions_and_overflow() {
    for text in [
        "",
        "KiB",
        "-1",
        "-1KiB",
        "1.5MiB",
        "64K",
        "64Kb ps",
        "lots",
        "1 2 KiB",
        "18446744073709551616",
        "16777216TiB",
        "0x10",
    ] {
        assert!(parse_size(text).is_err(), "{text:?} was accepted");
    }
    assert!(parse_size("16777216TiB").unwrap_err().contains("too large"));
}

#[test]
fn sizes_are_shown_with_their_unit_and_in_bytes() {
    assert_eq!(fmt_size(65536), "64KiB (65536 bytes)");
    assert_eq!(fmt_size(3 * GIB), "3GiB (3221225472 bytes)");
    assert_eq!(fmt_size(1000), "1000 bytes");
    assert_eq!(fmt_size(0), "0 bytes");
}

#[test]
fn store_location_is_read_leniently() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "[mqtt]\nca = 5\n[store]\npath = \"s/q.redb\"\nmax_bytes = \"2MiB\"\n",
    )
    .unwrap();
    assert_eq!(
        store_location(&file),
        (dir.path().join("s/q.redb"), 2 * MIB)
    );
    std::fs::write(
        &file,
        "[store]\npath = \"/abs/q.redb\"\nmax_bytes = 1048576\n",
    )
    .unwrap();
    assert_eq!(store_location(&file), (PathBuf::from("/abs/q.redb"), MIB));
    std::fs::write(&file, "not toml [").unwrap();
    assert_eq!(
        store_location(&file),
        (PathBuf::from(DEFAULT_STORE_PATH), DEFAULT_MAX_BYTES)
    );
}

// --- [telemetry] --------------------------------------------------------------------------

#[test]
fn telemetry_defaults_to_every_minute_without_a_text_file() {
    let c = valid(&plain("", ""));
    assert_eq!(c.telemetry, TelemetryConfig::default());
    assert_eq!(c.telemetry.interval, Some(Duration::from_secs(60)));
    assert_eq!(c.telemetry.textfile, None);
}

#[test]
fn telemetry_interval_zero_is_off_and_others_are_bounded() {
    let c = valid(&plain("", "[telemetry]\ninterval = \"0\""));
    assert_eq!(c.telemetry.interval, None);
    let c = valid(&plain("", "[telemetry]\ninterval = \"1s\""));
    assert_eq!(c.telemetry.interval, Some(Duration::from_secs(1)));
    for bad in ["\"500ms\"", "\"2d\"", "\"soon\"", "5"] {
        let text = plain("", &format!("[telemetry]\ninterval = {bad}"));
        let message = only_problem(&text, "telemetry.interval");
        assert!(!message.is_empty(), "{bad}");
    }
    let message = only_problem(
        &plain("", "[telemetry]\ninterval = \"999ms\""),
        "telemetry.interval",
    );
    assert!(message.contains("\"0\" (off)"), "{message}");
}

#[test]
fn telemetry_textfile_is_a_prom_file_resolved_against_the_config_dir() {
    let c = valid(&plain(
        "",
        "[telemetry]\ntextfile = \"metrics/edgesync.prom\"",
    ));
    assert_eq!(
        c.telemetry.textfile,
        Some(PathBuf::from("/test/metrics/edgesync.prom"))
    );
    let c = valid(&plain(
        "",
        "[telemetry]\ntextfile = \"/var/lib/node_exporter/edgesync.prom\"",
    ));
    assert_eq!(
        c.telemetry.textfile,
        Some(PathBuf::from("/var/lib/node_exporter/edgesync.prom"))
    );
    let message = only_problem(
        &plain("", "[telemetry]\ntextfile = \"/tmp/edgesync.txt\""),
        "telemetry.textfile",
    );
    assert!(message.contains(".prom"), "{message}");
    let message = only_problem(
        &plain("", "[telemetry]\ntextfile = \"/tmp/\""),
        "telemetry.textfile",
    );
    assert!(message.contains("directory"), "{message}");
    only_problem(
        &plain("", "[telemetry]\ntextfile = \"\""),
        "telemetry.textfile",
    );
    let message = only_problem(
        &plain("", "[telemetry]\ninterval = \"1s\"\ntext_file = \"x.prom\""),
        "telemetry.text_file",
    );
    assert!(message.contains("did you mean \"textfile\""), "{message}");
}

// --- [control] ----------------------------------------------------------------------------

#[test]
fn control_defaults_allow_every_non_destructive_command() {
    let c = valid(&plain("", ""));
    assert_eq!(c.control, ControlConfig::default());
    let allowed: Vec<&str> = c.control.allow.iter().map(|n| n.as_str()).collect();
    assert_eq!(
        allowed,
        [
            "ping",
            "status",
            "sync",
            "history",
            "rollback",
            "log-level",
            "config",
            "reload"
        ]
    );
    assert_eq!(c.control.replay_window, Duration::from_secs(86_400));
    assert_eq!(c.control.replay_max, 10_000);
    assert_eq!(
        valid(&plain("", "[control]")).control,
        ControlConfig::default()
    );
}

#[test]
fn control_allow_lists_exactly_what_runs_and_purge_only_when_listed() {
    let c = valid(&plain(
        "",
        "[control]\nallow = [\"ping\", \"purge\"]\nreplay_window = \"1h\"\nreplay_max = 5",
    ));
    assert_eq!(
        c.control.allow.iter().copied().collect::<Vec<_>>(),
        [CommandName::Ping, CommandName::Purge]
    );
    assert_eq!(c.control.replay_window, Duration::from_secs(3600));
    assert_eq!(c.control.replay_max, 5);
    let c = valid(&plain("", "[control]\nallow = []"));
    assert!(c.control.allow.is_empty());
}

#[test]
fn control_problems_are_reported() {
    let message = only_problem(
        &plain("", "[control]\nallow = [\"ping\", \"pruge\"]"),
        "control.allow",
    );
    assert!(message.contains("unknown command \"pruge\""), "{message}");
    assert!(message.contains("did you mean \"purge\""), "{message}");
    let message = only_problem(
        &plain("", "[control]\nallow = [\"ping\", \"ping\"]"),
        "control.allow",
    );
    assert!(message.contains("twice"), "{message}");
    let message = only_problem(&plain("", "[control]\nallow = \"ping\""), "control.allow");
    assert!(message.contains("an array of names"), "{message}");
    let message = only_problem(&plain("", "[control]\nallow = [1]"), "control.allow");
    assert!(message.contains("item 1 is an integer"), "{message}");
    for bad in ["\"30s\"", "\"31d\"", "\"soon\"", "5"] {
        let text = plain("", &format!("[control]\nreplay_window = {bad}"));
        only_problem(&text, "control.replay_window");
    }
    for bad in ["0", "-1", "1000001", "\"10\""] {
        let text = plain("", &format!("[control]\nreplay_max = {bad}"));
        only_problem(&text, "control.replay_max");
    }
    let message = only_problem(&plain("", "[control]\nallows = []"), "control.allows");
    assert!(message.contains("did you mean \"allow\""), "{message}");
}

// --- the shipped example files ---------------------------------------------------------

#[test]
fn example_config_is_valid_apart_from_the_missing_certificate_files() {
    let errors = Config::from_toml_str(Path::new(DEFAULT_CONFIG_PATH), EXAMPLE).unwrap_err();
    assert_eq!(
        keys(&errors.problems),
        ["mqtt.ca", "mqtt.cert", "mqtt.key"],
        "{errors}"
    );
    for problem in &errors.problems {
        assert!(
            problem.message.starts_with("cannot read \"/etc/edgesync/"),
            "{problem:?}"
        );
    }
}

#[test]
fn example_config_loads_when_its_certificate_files_exist_and_states_the_defaults() {
    let dir = tls_dir();
    let text = EXAMPLE.replace("/etc/edgesync/", &format!("{}/", dir.path().display()));
    let example = valid(&text);
    let defaults =
        valid(&tls_config("").replace("ca.pem", &format!("{}/ca.pem", dir.path().display())));
    assert_eq!(
        example.mqtt.url.to_string(),
        "mqtts://broker.example.com:8883"
    );
    assert_eq!(example.mqtt.topic_prefix, defaults.mqtt.topic_prefix);
    assert_eq!(example.mqtt.keep_alive, defaults.mqtt.keep_alive);
    assert_eq!(example.mqtt.allow_plaintext, defaults.mqtt.allow_plaintext);
    assert_eq!(
        example.mqtt.reconnect_jitter,
        defaults.mqtt.reconnect_jitter
    );
    assert_eq!(
        format!("{:?}", example.store),
        format!("{:?}", defaults.store)
    );
    assert_eq!(
        format!("{:?}", example.sync),
        format!("{:?}", defaults.sync)
    );
    assert_eq!(
        format!("{:?}", example.local),
        format!("{:?}", defaults.local)
    );
    assert_eq!(format!("{:?}", example.log), format!("{:?}", defaults.log));
    assert_eq!(example.telemetry, defaults.telemetry);
    assert_eq!(example.control, defaults.control);
    assert_eq!(example.control, ControlConfig::default());
    assert_eq!(example.desired, defaults.desired);
    assert_eq!(example.desired, DesiredConfig::default());
}

/// The example with its commented-out keys (`# key = value`) and arrays of tables
/// (`# [[desired.rule]]`) put into effect; `mqtt.urls` replaces `mqtt.url` (one of the two).
fn uncommented_example() -> String {
    EXAMPLE
        .lines()
        .filter(|l| !l.starts_with("url = \"mqtts://broker"))
        .map(|l| {
            l.strip_prefix("# ")
                .filter(|rest| {
                    let table = rest.starts_with("[[") && rest.ends_with("]]");
                    table
                        || rest.split_once(" = ").is_some_and(|(key, _)| {
                            key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        })
                })
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn example_config_documents_every_key() {
    for (section, keys) in SECTIONS {
        assert!(
            EXAMPLE.lines().any(|l| l == format!("[{section}]")),
            "[{section}] is missing"
        );
        for key in *keys {
            if SUBTABLES.iter().any(|t| t.0 == *section && t.1 == *key) {
                continue;
            }
            let set = format!("{key} = ");
            let commented = format!("# {key} = ");
            assert!(
                EXAMPLE
                    .lines()
                    .any(|l| l.starts_with(&set) || l.starts_with(&commented)),
                "{section}.{key} is missing from the example"
            );
        }
    }
    // Every array of tables has commented examples that use every one of its keys.
    for (section, table, keys) in SUBTABLES {
        let header = format!("# [[{section}.{table}]]");
        assert!(EXAMPLE.lines().any(|l| l == header), "{header} is missing");
        let mut in_table = false;
        let mut used = Vec::new();
        for line in EXAMPLE.lines() {
            if line.starts_with("# [[") || line.starts_with('[') {
                in_table = line == header;
            } else if in_table
                && let Some((key, _)) = line.strip_prefix("# ").and_then(|l| l.split_once(" = "))
            {
                used.push(key);
            }
        }
        for key in *keys {
            assert!(
                used.contains(key),
                "{key} of [[{section}.{table}]] is missing from the example"
            );
            // And it is described (in the list above the examples).
            assert!(
                EXAMPLE
                    .lines()
                    .any(|l| l.strip_prefix("#   ").is_some_and(|l| {
                        let names = l.split("  ").next().unwrap_or_default();
                        names.split(", ").any(|name| name == *key)
                    })),
                "{key} of [[{section}.{table}]] is not described in the example"
            );
        }
    }
    // The commented-out keys and tables are valid too.
    let uncommented = uncommented_example();
    let errors = Config::from_toml_str(Path::new(DEFAULT_CONFIG_PATH), &uncommented).unwrap_err();
    assert_eq!(
        keys(&errors.problems),
        [
            "mqtt.ca",
            "mqtt.cert",
            "mqtt.key",
            "mqtt.password_file",
            "source.mqtt[1].password_file"
        ],
        "{errors}"
    );
    // And they mean what they say.
    let dir = tls_dir();
    std::fs::write(dir.path().join("mqtt-password"), "secret").unwrap();
    private(&dir.path().join("mqtt-password"));
    let text = uncommented
        .replace("/etc/edgesync/", &format!("{}/", dir.path().display()))
        .replace("# username = ", "username = ");
    let desired = valid(&text).desired;
    let defaults = DesiredConfig::default();
    assert_eq!(
        (
            desired.max_document_bytes,
            desired.max_depth,
            desired.unknown_keys,
            desired.history,
            desired.concurrency,
            desired.handler_timeout
        ),
        (
            defaults.max_document_bytes,
            defaults.max_depth,
            defaults.unknown_keys,
            defaults.history,
            defaults.concurrency,
            defaults.handler_timeout
        )
    );
    assert_eq!(desired.rules.len(), 3);
    assert_eq!(desired.conflicts.len(), 3);
    assert!(matches!(
        desired.conflicts[1].policy,
        Policy::Merge { ref argv, timeout } if argv.len() == 2 && timeout == Duration::from_secs(5)
    ));
    let kinds: Vec<&HandlerKind> = desired.handlers.iter().map(|h| &h.kind).collect();
    assert!(matches!(
        kinds[..],
        [
            HandlerKind::Exec { .. },
            HandlerKind::File { .. },
            HandlerKind::Watch { .. }
        ]
    ));
}

#[test]
fn dev_config_is_valid_when_its_certificate_files_exist() {
    let repo = tempfile::tempdir().unwrap();
    let config_dir = repo.path().join("config");
    let certs = repo.path().join("target/dev-certs");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::create_dir_all(&certs).unwrap();
    for name in ["ca.pem", "device.pem", "device.key"] {
        std::fs::write(certs.join(name), "x").unwrap();
    }
    private(&certs.join("device.key"));
    let file = config_dir.join("dev.toml");
    std::fs::write(&file, DEV).unwrap();
    let config = Config::load(&file).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(config.device.id.as_str(), "dev-0001");
    assert_eq!(config.mqtt.url.to_string(), "mqtts://localhost:8883");
    assert_eq!(
        config.mqtt.ca,
        Some(config_dir.join("../target/dev-certs/ca.pem"))
    );
    assert_eq!(
        config.store.path,
        config_dir.join("../target/dev/edgesync.redb")
    );
    assert_eq!(config.local.socket, Path::new("/tmp/edgesync-dev.sock"));
}

#[test]
fn dev_config_without_certificate_files_reports_only_those() {
    let errors =
        Config::from_toml_str(Path::new("/nonexistent-edgesync-repo/config/dev.toml"), DEV)
            .unwrap_err();
    assert_eq!(
        keys(&errors.problems),
        ["mqtt.ca", "mqtt.cert", "mqtt.key"],
        "{errors}"
    );
    assert!(
        errors.problems[0]
            .message
            .contains("/nonexistent-edgesync-repo/config/../target/dev-certs/ca.pem")
    );
}

#[test]
fn raw_structs_read_every_key_of_the_file_format() {
    // The one reader of the file (there is no second, serde-derived one to compare with):
    // it reads the example without a problem, each key into its field, under its dotted name.
    let root: Table = toml::from_str(EXAMPLE).unwrap();
    let mut p = Problems::default();
    let collected = RawConfig::collect(&root, &mut p);
    assert!(p.0.is_empty(), "{p:?}");
    assert_eq!(
        collected.store.max_bytes.value,
        Some(RawSize::Text("256MiB".to_owned()))
    );
    assert_eq!(collected.store.max_bytes.key, "store.max_bytes");
    let mut p = Problems::default();
    let sized = RawStore::collect(
        &toml::from_str("max_bytes = 1048576").unwrap(),
        "store",
        &mut p,
    );
    assert_eq!(sized.max_bytes.value, Some(RawSize::Bytes(1_048_576)));
    // Unknown keys are refused.
    for text in [
        "[mqtt]\nkeepalive = \"1s\"",
        "[contrl]",
        "[[desired.rule]]\nkey = \"a\"",
    ] {
        let mut p = Problems::default();
        RawConfig::collect(&toml::from_str(text).unwrap(), &mut p);
        assert!(!p.0.is_empty(), "{text}");
    }
    // Also with every array of tables and every key of [desired] in use: every key of every
    // table is read (a key in a KEYS list that no field read would be left unset here).
    let uncommented = uncommented_example();
    let root: Table = toml::from_str(&uncommented).unwrap();
    let mut p = Problems::default();
    let collected = RawConfig::collect(&root, &mut p);
    assert!(p.0.is_empty(), "{p:?}");
    let desired = collected.desired;
    assert_eq!(desired.max_depth.value, Some(16));
    assert_eq!(desired.rule.value.as_ref().map(Vec::len), Some(3));
    assert_eq!(desired.conflict.value.as_ref().map(Vec::len), Some(3));
    assert_eq!(desired.handler.value.as_ref().map(Vec::len), Some(3));
    let rules = desired.rule.value.unwrap();
    let rule = &rules[0];
    assert_eq!(rule.kind.value.as_deref(), Some("number"));
    assert_eq!(rule.kind.key, "desired.rule[1].type");
    assert_eq!(rule.min.value, Some(RawNumber::Integer(5)));
    assert_eq!(rule.max.value, Some(RawNumber::Float(30.5)));
}

// --- socket_path, resolve_path ---------------------------------------------------------

#[test]
fn socket_path_reads_the_socket_and_ignores_every_other_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("e.toml");
    std::fs::write(
        &file,
        "[device]\nid = \"bad id\"\nbogus = 1\n[local]\nsocket = \"/tmp/x.sock\"\nextra = 2\n\
             [desired]\nwhatever = true\n",
    )
    .unwrap();
    assert_eq!(socket_path(&file), Path::new("/tmp/x.sock"));
    assert!(Config::load(&file).is_err());
}

#[test]
fn socket_path_falls_back_to_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let default = Path::new(DEFAULT_SOCKET);
    assert_eq!(socket_path(&dir.path().join("missing.toml")), default);
    assert_eq!(socket_path(dir.path()), default);
    for text in [
        "",
        "[local\nsocket = \"/tmp/x.sock\"",
        "[device]\nid = \"d\"\n",
        "[local]\n",
        "[local]\nsocket = 5\n",
        "[local]\nsocket = \"\"\n",
        "local = \"/tmp/x.sock\"\n",
    ] {
        let file = dir.path().join("e.toml");
        std::fs::write(&file, text).unwrap();
        assert_eq!(socket_path(&file), default, "{text:?}");
    }
}

#[test]
fn config_path_comes_from_the_flag_then_the_environment_then_the_default() {
    let flag = Path::new("/flag.toml");
    let env = || Some(OsString::from("/env.toml"));
    assert_eq!(choose_path(Some(flag), env()), flag);
    assert_eq!(choose_path(None, env()), Path::new("/env.toml"));
    assert_eq!(
        choose_path(None, Some(OsString::new())),
        Path::new(DEFAULT_CONFIG_PATH)
    );
    assert_eq!(choose_path(None, None), Path::new(DEFAULT_CONFIG_PATH));
}

#[test]
fn suggestions_are_within_edit_distance_two() {
    assert_eq!(edit_distance("keepalive", "keep_alive"), 1);
    assert_eq!(edit_distance("", "abc"), 3);
    assert_eq!(edit_distance("kitten", "sitting"), 3);
    assert_eq!(
        suggest("Encodng", &["encoding", "linger"]),
        Some("encoding")
    );
    assert_eq!(suggest("zzz", &["encoding", "linger"]), None);
}

// --- [cloud] and [aws] ------------------------------------------------------------------

#[test]
fn the_default_profile_is_edgesync_and_aws_keys_need_the_aws_profile() {
    assert_eq!(valid(&plain("", "")).aws, None);
    assert_eq!(
        valid(&plain("", "[cloud]\nprofile = \"edgesync\"")).aws,
        None
    );
    let m = only_problem(&plain("", "[cloud]\nprofile = \"aws\""), "cloud.profile");
    assert!(
        m.contains("\"edgesync\" or \"aws-iot\" or \"azure-iot-hub\""),
        "{m}"
    );
    // [aws] is checked, and unused, with the edgesync profile.
    assert_eq!(valid(&plain("", "[aws]\nthing = \"t\"")).aws, None);
    only_problem(&plain("", "[aws]\nthing = \"t.1\""), "aws.thing");
}

#[test]
fn the_azure_profile_needs_the_hub_and_sets_the_user_name() {
    let azure = |extra: &str| {
        plain(
            "",
            &format!("[cloud]\nprofile = \"azure-iot-hub\"\n{extra}"),
        )
    };
    let m = only_problem(&azure(""), "azure.hub");
    assert!(m.contains("missing required key"), "{m}");
    let c = valid(&azure("[azure]\nhub = \"h1.azure-devices.net\""));
    let a = c.azure.clone().unwrap();
    assert_eq!(
        (a.hub.as_str(), a.device.as_str(), a.api_version.as_str()),
        ("h1.azure-devices.net", "pump-0042", "2021-04-12")
    );
    assert_eq!(c.aws, None);
    assert_eq!(
        c.mqtt.username.as_deref(),
        Some("h1.azure-devices.net/pump-0042/?api-version=2021-04-12")
    );
    assert_eq!(c.mqtt.client_id, "pump-0042");
    // The change history batch fits in one IoT Hub message, properties included.
    assert_eq!(c.sync.batch_max_bytes, 256 * KIB - 4096);
    let c = valid(&azure(
        "[azure]\nhub = \"h\"\napi_version = \"2020-10-01-preview\"",
    ));
    assert_eq!(c.azure.unwrap().api_version, "2020-10-01-preview");
    // [azure] is checked, and unused, with another profile.
    assert_eq!(valid(&plain("", "[azure]\nhub = \"h\"")).azure, None);
    only_problem(&plain("", "[azure]\nhub = \"h/x\""), "azure.hub");
}

#[test]
fn azure_keys_are_checked_against_the_iot_hub_limits() {
    let azure = |mqtt: &str, extra: &str| {
        plain(
            mqtt,
            &format!("[cloud]\nprofile = \"azure-iot-hub\"\n[azure]\nhub = \"h\"\n{extra}"),
        )
    };
    let m = only_problem(&azure("", "api_version = \"latest\""), "azure.api_version");
    assert!(m.contains("2021-04-12"), "{m}");
    let m = only_problem(
        &azure("", "[sync]\nbatch_max_bytes = \"256KiB\""),
        "sync.batch_max_bytes",
    );
    assert!(
        m.contains("at most 258048 bytes") && m.contains("256 KB"),
        "{m}"
    );
    let m = only_problem(&azure("keep_alive = \"30m\"", ""), "mqtt.keep_alive");
    assert!(m.contains("1s to 1177s"), "{m}");
    let m = only_problem(&azure("client_id = \"other\"", ""), "mqtt.client_id");
    assert!(m.contains("must be the device id"), "{m}");
    let m = only_problem(&azure("username = \"me\"", ""), "mqtt.username");
    assert!(m.contains("h/pump-0042/?api-version=2021-04-12"), "{m}");
    // The user name it would set anyway is accepted.
    valid(&azure(
        "username = \"h/pump-0042/?api-version=2021-04-12\"\nclient_id = \"pump-0042\"",
        "",
    ));
}

#[test]
fn the_aws_profile_has_documented_defaults() {
    let c = valid(&plain("", "[cloud]\nprofile = \"aws-iot\""));
    let a = c.aws.unwrap();
    assert_eq!(a.thing, "pump-0042");
    assert_eq!(a.shadow, "");
    assert_eq!(a.telemetry_topic, "edgesync/pump-0042/changes");
    assert_eq!(a.presence_topic, "edgesync/pump-0042/presence");
    assert_eq!(a.metrics_topic, "edgesync/pump-0042/metrics");
    assert!(a.nested);
    assert!(a.shadow_map.is_empty());
    // The change history batch fits in one AWS IoT Core message.
    assert_eq!(c.sync.batch_max_bytes, 128_000);
}

#[test]
fn every_aws_key_can_be_set() {
    let c = valid(&plain(
        "",
        "[cloud]\nprofile = \"aws-iot\"\n[sync]\nbatch_max_bytes = \"100KiB\"\n\
         [aws]\nthing = \"pump:42\"\nshadow = \"edge\"\ntelemetry_topic = \"$aws/rules/hist/{thing}\"\n\
         presence_topic = \"p/{thing}\"\nmetrics_topic = \"m/{thing}\"\nnested = false\n\
         [[aws.shadow_map]]\nkeys = [\"net.*\", \"gps.*\"]\nshadow = \"geo\"\n\
         [[aws.shadow_map]]\nkeys = [\"classic.*\"]\nshadow = \"\"\n",
    ));
    let a = c.aws.unwrap();
    assert_eq!((a.thing.as_str(), a.shadow.as_str()), ("pump:42", "edge"));
    assert_eq!(a.telemetry_topic, "$aws/rules/hist/pump:42");
    assert_eq!(
        (a.presence_topic.as_str(), a.metrics_topic.as_str()),
        ("p/pump:42", "m/pump:42")
    );
    assert!(!a.nested);
    assert_eq!(a.shadow_of("gps.lat"), "geo");
    assert_eq!(a.shadow_of("classic.x"), "");
    assert_eq!(a.shadow_of("temp"), "edge");
    assert_eq!(c.sync.batch_max_bytes, 100 * KIB);
}

#[test]
fn aws_keys_are_checked_against_the_aws_iot_core_limits() {
    let aws = |extra: &str| plain("", &format!("[cloud]\nprofile = \"aws-iot\"\n{extra}"));
    let m = only_problem(
        &aws("[sync]\nbatch_max_bytes = \"256KiB\""),
        "sync.batch_max_bytes",
    );
    assert!(
        m.contains("at most 128000 bytes") && m.contains("128 KB"),
        "{m}"
    );
    let m = only_problem(&aws("[aws]\nthing = \"a.b\""), "aws.thing");
    assert!(m.contains("[a-zA-Z0-9:_-]"), "{m}");
    let m = only_problem(
        &plain("", "[cloud]\nprofile = \"aws-iot\"").replace("pump-0042", "pump.1"),
        "aws.thing",
    );
    assert!(m.contains("(device.id; set aws.thing)"), "{m}");
    let m = only_problem(
        &aws(&format!("[aws]\nshadow = \"{}\"", "s".repeat(65))),
        "aws.shadow",
    );
    assert!(m.contains("1-64"), "{m}");
    let m = only_problem(
        &aws("[aws]\ntelemetry_topic = \"a/b/c/d/e/f/g/h/{thing}\""),
        "aws.telemetry_topic",
    );
    assert!(m.contains("AWS IoT Core's limits"), "{m}");
    let m = only_problem(
        &aws("[aws]\npresence_topic = \"$aws/things/x\""),
        "aws.presence_topic",
    );
    assert!(m.contains("AWS IoT Core's limits"), "{m}");
    let m = only_problem(
        &aws("[[aws.shadow_map]]\nkeys = []\nshadow = \"x\""),
        "aws.shadow_map[1].keys",
    );
    assert!(m.contains("at least one"), "{m}");
    let m = only_problem(
        &aws("[[aws.shadow_map]]\nkeys = [\"a\"]"),
        "aws.shadow_map[1].shadow",
    );
    assert!(m.contains("missing"), "{m}");
    let m = only_problem(
        &aws("[[aws.shadow_map]]\nkeys = [\"a\"]\nshadow = \"x\"\nbogus = 1"),
        "aws.shadow_map[1].bogus",
    );
    assert!(m.contains("expected one of keys, shadow"), "{m}");
    let many: String = (0..16)
        .map(|i| format!("[[aws.shadow_map]]\nkeys = [\"k{i}\"]\nshadow = \"s{i}\"\n"))
        .collect();
    let m = only_problem(&aws(&many), "aws.shadow_map");
    assert!(m.contains("at most 16 shadows"), "{m}");
    // Every problem at once, also when the thing name is wrong.
    let p = problems(&aws(
        "[sync]\nbatch_max_bytes = \"256KiB\"\n[aws]\nthing = \"a.b\"\nmetrics_topic = \"+\"",
    ));
    assert_eq!(
        keys(&p),
        ["sync.batch_max_bytes", "aws.thing", "aws.metrics_topic"],
        "{p:#?}"
    );
    // The edgesync profile keeps its own limits.
    assert_eq!(
        valid(&plain("", "[sync]\nbatch_max_bytes = \"256KiB\""))
            .sync
            .batch_max_bytes,
        256 * KIB
    );
}

#[test]
fn the_aws_profile_keeps_the_keep_alive_within_aws_iot_cores_range() {
    let aws = |k: &str| {
        plain(
            &format!("keep_alive = \"{k}\""),
            "[cloud]\nprofile = \"aws-iot\"",
        )
    };
    for (ok, secs) in [("30s", 30), ("20m", 1200), ("1200s", 1200)] {
        assert_eq!(valid(&aws(ok)).mqtt.keep_alive, Duration::from_secs(secs));
    }
    for bad in ["29s", "1201s", "1h"] {
        let m = only_problem(&aws(bad), "mqtt.keep_alive");
        assert!(
            m.contains("30s to 1200s") && m.contains("aws-iot"),
            "{bad}: {m}"
        );
    }
    // The edgesync profile keeps its own range.
    assert_eq!(
        valid(&plain("keep_alive = \"1h\"", "")).mqtt.keep_alive,
        Duration::from_secs(3600)
    );
}

// --- [[source.mqtt]] -------------------------------------------------------------------

fn with_source(entry: &str) -> String {
    plain("", &format!("[[source.mqtt]]\n{entry}\n"))
}

#[test]
fn sources_are_off_by_default_and_take_their_defaults() {
    assert!(valid(&plain("", "")).sources.is_empty());
    let c = valid(&with_source(
        "url = \"mqtt://127.0.0.1:1884\"\nfilter = \"s/+/t\"\nkey = \"{2}.t\"",
    ));
    let s = &c.sources[0];
    assert_eq!(s.url.to_string(), "mqtt://127.0.0.1:1884");
    assert_eq!(s.client_id, "pump-0042-source-1");
    assert_eq!(s.value, crate::model::source::ValueRule::Payload);
    assert_eq!((s.qos, s.max_inflight), (1, DEFAULT_SOURCE_INFLIGHT));
    assert_eq!(s.keep_alive, Duration::from_secs(30));
    let c = valid(&with_source(
        "url = \"unix:///run/mosquitto/m.sock\"\nfilter = \"#\"\nkey = \"{1}\"\nvalue = \"/a\"",
    ));
    assert_eq!(
        c.sources[0].url,
        SourceUrl::Unix("/run/mosquitto/m.sock".into())
    );
}

#[test]
fn source_keys_are_checked_with_clear_errors() {
    let m = only_problem(
        &with_source("url = \"mqtt://10.0.0.5:1883\"\nfilter = \"a\"\nkey = \"k\""),
        "source.mqtt[1].url",
    );
    assert!(m.contains("loopback"), "{m}");
    let m = only_problem(
        &with_source("url = \"mqtts://localhost\"\nfilter = \"a\"\nkey = \"k\""),
        "source.mqtt[1].url",
    );
    assert!(m.contains("loopback"), "{m}");
    let m = only_problem(
        &with_source("url = \"mqtt://[::1]:1\"\nfilter = \"a/#/b\"\nkey = \"k\""),
        "source.mqtt[1].filter",
    );
    assert!(m.contains("last level"), "{m}");
    let m = only_problem(
        &with_source("url = \"mqtt://localhost:1\"\nfilter = \"a/+\"\nkey = \"{3}.x\""),
        "source.mqtt[1].key",
    );
    assert!(m.contains("no level 3"), "{m}");
    let m = only_problem(
        &with_source("url = \"mqtt://localhost:1\"\nfilter = \"a\"\nkey = \"k\"\nvalue = \"raw\""),
        "source.mqtt[1].value",
    );
    assert!(m.contains("JSON pointer"), "{m}");
    let p = problems(&with_source(
        "url = \"unix:relative\"\nfilter = \"a\"\nkey = \"k\"\nqos = 2\nmax_inflight = 0\nfilter2 = 1",
    ));
    assert_eq!(
        keys(&p),
        [
            "source.mqtt[1].url",
            "source.mqtt[1].qos",
            "source.mqtt[1].max_inflight",
            "source.mqtt[1].filter2"
        ]
    );
    let missing = problems(&plain("", "[[source.mqtt]]\n"));
    assert_eq!(
        keys(&missing),
        [
            "source.mqtt[1].url",
            "source.mqtt[1].filter",
            "source.mqtt[1].key"
        ]
    );
    // Each source its own session; a bounded number of them.
    let two = "url = \"mqtt://localhost:1\"\nfilter = \"a\"\nkey = \"k\"\nclient_id = \"x\"\n";
    let text = plain("", &format!("[[source.mqtt]]\n{two}[[source.mqtt]]\n{two}"));
    assert!(only_problem(&text, "source.mqtt[2].client_id").contains("earlier"));
    let many: String = (0..17)
        .map(|i| format!("[[source.mqtt]]\nurl = \"mqtt://localhost:1\"\nfilter = \"a\"\nkey = \"k\"\nclient_id = \"c{i}\"\n"))
        .collect();
    assert!(only_problem(&plain("", &many), "source.mqtt").contains("at most 16"));
}

#[test]
fn a_source_filter_that_would_loop_is_refused() {
    // mqtt.url of `plain` is mqtt://localhost:1883: a source on 127.0.0.1:1883 is that broker.
    let looping = |filter: &str| {
        with_source(&format!(
            "url = \"mqtt://127.0.0.1:1883\"\nfilter = \"{filter}\"\nkey = \"k\""
        ))
    };
    for f in [
        "#",
        "edgesync/+/reported",
        "+/pump-0042/#",
        "edgesync/pump-0042/cmd/+",
    ] {
        let m = only_problem(&looping(f), "source.mqtt[1].filter");
        assert!(m.contains("loop"), "{f}: {m}");
    }
    for f in ["sensors/#", "edgesync/other/#", "$SYS/#"] {
        valid(&looping(f));
    }
    // Another broker (another port) may be subscribed to with any filter.
    valid(&with_source(
        "url = \"mqtt://127.0.0.1:1884\"\nfilter = \"#\"\nkey = \"k\"",
    ));
    // The profile's own topics count: aws-iot's $aws/things/{thing}/...
    let aws = looping("$aws/things/+/shadow/#")
        .replace("[[source", "[cloud]\nprofile = \"aws-iot\"\n[[source");
    assert!(only_problem(&aws, "source.mqtt[1].filter").contains("$aws/things/pump-0042/#"));
}

#[test]
fn store_classes_are_read_in_order_with_their_defaults() {
    let c = valid(&plain(
        "",
        "[store]\n\
         [[store.class]]\nname = \"temps\"\nkeys = \"temp.*\"\npriority = 10\nttl = \"1h\"\n\
         deadband = 0.5\nmax_interval = \"5m\"\n\
         [[store.class]]\nkeys = \"door.*\"\ndedupe = true\n",
    ));
    let classes = &c.store.classes;
    assert_eq!(classes.len(), 2);
    assert_eq!(classes[0].name, "temps");
    assert_eq!(classes[0].priority, 10);
    assert_eq!(classes[0].ttl, Some(Duration::from_secs(3600)));
    assert_eq!(classes[0].deadband, Some(0.5));
    assert_eq!(classes[0].max_interval, Some(Duration::from_secs(300)));
    assert!(!classes[0].dedupe);
    // The name defaults to the glob; the priority to the default class's.
    assert_eq!(classes[1].name, "door.*");
    assert_eq!(classes[1].priority, DEFAULT_CLASS_PRIORITY);
    assert!(classes[1].dedupe && classes[1].ttl.is_none());
    assert!(valid(&plain("", "")).store.classes.is_empty());
}

#[test]
fn store_class_problems_name_their_key() {
    let class = |body: &str| plain("", &format!("[[store.class]]\n{body}\n"));
    only_problem(&class("priority = 1"), "store.class[1].keys");
    only_problem(
        &class("keys = \"a\"\npriority = 101"),
        "store.class[1].priority",
    );
    only_problem(&class("keys = \"a\"\nttl = \"10ms\""), "store.class[1].ttl");
    only_problem(
        &class("keys = \"a\"\ndeadband = 0"),
        "store.class[1].deadband",
    );
    only_problem(
        &class("keys = \"a\"\ndeadband = -1.5"),
        "store.class[1].deadband",
    );
    only_problem(&class("keys = \"a b\""), "store.class[1].keys");
    only_problem(
        &class("keys = \"a\"\nname = \"default\""),
        "store.class[1].name",
    );
    only_problem(
        &class("keys = \"a\"\nname = \"a b\""),
        "store.class[1].name",
    );
    only_problem(&class("keys = \"a\"\nfoo = 1"), "store.class[1].foo");
    let m = only_problem(
        &class("keys = \"a\"\nmax_interval = \"1m\""),
        "store.class[1].max_interval",
    );
    assert!(m.contains("deadband or dedupe"), "{m}");
    // Duplicate names; an entry after a `*` is never used.
    let text = plain(
        "",
        "[[store.class]]\nkeys = \"a\"\nname = \"x\"\n[[store.class]]\nkeys = \"b\"\nname = \"x\"\n",
    );
    only_problem(&text, "store.class[2].name");
    let text = plain(
        "",
        "[[store.class]]\nkeys = \"*\"\n[[store.class]]\nkeys = \"b\"\n",
    );
    only_problem(&text, "store.class[2].keys");
    // Bounded: at most 32.
    let many: String = (0..33)
        .map(|i| format!("[[store.class]]\nkeys = \"k{i}\"\n"))
        .collect();
    only_problem(&plain("", &many), "store.class");
}

// ---------------------------------------------------------------------------------------------
// mqtt.urls (issue 20).

fn with_urls(mqtt: &str) -> String {
    format!("[device]\nid = \"d\"\n[mqtt]\n{mqtt}\nallow_plaintext = true\n")
}

#[test]
fn mqtt_urls_list_the_nodes_in_order() {
    let c = valid(&with_urls(
        "urls = [\"mqtt://a\", \"mqtt://b:1884\"]\nurl_order = \"shuffled\"",
    ));
    let urls: Vec<String> = c.mqtt.urls.iter().map(ToString::to_string).collect();
    assert_eq!(urls, ["mqtt://a:1883", "mqtt://b:1884"]);
    assert_eq!(c.mqtt.url, c.mqtt.urls[0]);
    assert_eq!(c.mqtt.url_order, UrlOrder::Shuffled);
}

#[test]
fn mqtt_url_alone_is_a_list_of_one_in_order() {
    let c = valid(&with_urls("url = \"mqtt://a\""));
    assert_eq!(c.mqtt.urls, std::slice::from_ref(&c.mqtt.url));
    assert_eq!(c.mqtt.url_order, UrlOrder::InOrder);
}

#[test]
fn mqtt_urls_problems_name_the_key() {
    let both = only_problem(
        &with_urls("url = \"mqtt://a\"\nurls = [\"mqtt://b\"]"),
        "mqtt.urls",
    );
    assert!(both.contains("together with mqtt.url"), "{both}");
    let empty = only_problem(&with_urls("urls = []"), "mqtt.urls");
    assert!(empty.contains("1 to 16"), "{empty}");
    let many: Vec<String> = (0..17).map(|i| format!("\"mqtt://n{i}\"")).collect();
    let many = only_problem(
        &with_urls(&format!("urls = [{}]", many.join(", "))),
        "mqtt.urls",
    );
    assert!(many.contains("found 17"), "{many}");
    let bad = only_problem(
        &with_urls("urls = [\"mqtt://a\", \"tcp://b\"]"),
        "mqtt.urls[2]",
    );
    assert!(bad.contains("mqtts://"), "{bad}");
    let twice = only_problem(
        &with_urls("urls = [\"mqtt://a\", \"mqtt://a:1883\"]"),
        "mqtt.urls[2]",
    );
    assert!(twice.contains("twice"), "{twice}");
    let order = only_problem(
        &with_urls("url = \"mqtt://a\"\nurl_order = \"random\""),
        "mqtt.url_order",
    );
    assert!(order.contains("shuffled"), "{order}");
    let missing = only_problem(
        "[device]\nid = \"d\"\n[mqtt]\nallow_plaintext = true\n",
        "mqtt.url",
    );
    assert!(missing.contains("mqtt.urls"), "{missing}");
}

#[test]
fn mqtt_urls_refuse_plaintext_and_mixed_schemes() {
    let plain = only_problem(
        "[device]\nid = \"d\"\n[mqtt]\nurls = [\"mqtt://a\"]\n",
        "mqtt.urls[1]",
    );
    assert!(plain.contains("allow_plaintext"), "{plain}");
    let mixed = only_problem(
        &with_urls("urls = [\"mqtt://a\", \"mqtts://b\"]"),
        "mqtt.urls[2]",
    );
    assert!(mixed.contains("one scheme"), "{mixed}");
}
