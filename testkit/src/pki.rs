//! A throw-away PKI made at run time with rcgen (ring): the certificates every TLS test
//! needs, good and deliberately broken. Nothing here is ever committed.
//!
//! All files are PEM, written under one directory with mode 0644, and the directory gets
//! 0755: Mosquitto started as root drops to the `mosquitto` user and must still read them.
//! (These are test keys; world-readable is the point.) Client keys (every `*.key` but the
//! servers') get 0600: the agent refuses a private key that other users can read.
//!
//! | field | what |
//! | --- | --- |
//! | `ca` | the CA the agent trusts ("edgesync test CA") |
//! | `server_cert` / `server_key` | server cert by `ca`, SANs `localhost` and `127.0.0.1` |
//! | `client_cert` / `client_key` | client cert by `ca`, CN = device id, O = org; EC P-256 key as PKCS#8 |
//! | `client_key_sec1` | the same key as SEC1 PEM (label `EC` key) |
//! | `client_rsa_cert` / `client_rsa_key_pkcs8` / `client_rsa_key_pkcs1` | an RSA-2048 client (PKCS#1 PEM, label `RSA` key); `None` when the `openssl` program is missing (ring cannot generate RSA keys) |
//! | `wrong_ca` | an unrelated CA |
//! | `wrong_ca_server_cert` / `_key` | server cert for `localhost`/`127.0.0.1` by `wrong_ca` |
//! | `wrong_ca_client_cert` / `_key` | client cert by `wrong_ca` (a broker trusting `ca` rejects it) |
//! | `wrong_name_server_cert` / `_key` | server cert by `ca` for `wrong.example` only |
//! | `expired_server_cert` / `_key` | server cert by `ca`, SANs as above, expired (2020-2021) |
//! | `expired_client_cert` / `_key` | client cert by `ca`, expired (2020-2021) |
//! | `chain_server_cert` / `_key` | server cert (names as `server_cert`) issued through [`CHAIN_INTERMEDIATES`] intermediate CAs under `ca`; the file holds the leaf, then the intermediates, nearest first |
//! | `chain_client_cert` / `_key` | client cert (as `client_cert`) through the same intermediates, same file layout |

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256, date_time_ymd,
};

use crate::{Context, Result};

/// Default device id (client certificate CN) of [`TestPki::generate`].
pub const DEFAULT_DEVICE_ID: &str = "pump-0042";
/// Default organisation (client certificate O). rumqttd's `verify-client-cert` turns it
/// into a tenant prefix and requires it to be alphanumeric.
pub const DEFAULT_ORG: &str = "edgesync";
/// The CN of the CA the agent trusts.
pub const CA_NAME: &str = "edgesync test CA";
/// Intermediate CAs between `ca` and the `chain_*` certificates.
pub const CHAIN_INTERMEDIATES: usize = 5;
/// The only name in the wrong-name server certificate.
pub const WRONG_NAME: &str = "wrong.example";

/// Which server certificate a test broker presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerCert {
    /// Signed by `ca`, valid for `localhost` and `127.0.0.1`.
    #[default]
    Good,
    /// Signed by the unrelated `wrong_ca`.
    WrongCa,
    /// Signed by `ca` but for `wrong.example` only.
    WrongName,
    /// Signed by `ca`, expired.
    Expired,
    /// Issued through [`CHAIN_INTERMEDIATES`] intermediates under `ca`, sent with them.
    Chain,
}

/// The PEM files of a test PKI; see the module doc for what each one is.
pub struct TestPki {
    /// The directory holding every file.
    pub dir: PathBuf,
    /// CN of the client certificates.
    pub device_id: String,
    /// O of the client certificates.
    pub org: String,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    /// EC P-256, PKCS#8 PEM.
    pub client_key: PathBuf,
    /// The same key as `client_key`, SEC1 PEM.
    pub client_key_sec1: PathBuf,
    /// RSA-2048 client certificate; `None` without the `openssl` program.
    pub client_rsa_cert: Option<PathBuf>,
    /// Its key as PKCS#8 PEM.
    pub client_rsa_key_pkcs8: Option<PathBuf>,
    /// Its key as PKCS#1 PEM.
    pub client_rsa_key_pkcs1: Option<PathBuf>,
    pub wrong_ca: PathBuf,
    pub wrong_ca_server_cert: PathBuf,
    pub wrong_ca_server_key: PathBuf,
    pub wrong_ca_client_cert: PathBuf,
    pub wrong_ca_client_key: PathBuf,
    pub wrong_name_server_cert: PathBuf,
    pub wrong_name_server_key: PathBuf,
    pub expired_server_cert: PathBuf,
    pub expired_server_key: PathBuf,
    pub expired_client_cert: PathBuf,
    pub expired_client_key: PathBuf,
    pub chain_server_cert: PathBuf,
    pub chain_server_key: PathBuf,
    pub chain_client_cert: PathBuf,
    pub chain_client_key: PathBuf,
    ca_issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki")
            .field("dir", &self.dir)
            .field("device_id", &self.device_id)
            .field("org", &self.org)
            .finish_non_exhaustive()
    }
}

impl TestPki {
    /// Generates everything under `dir` (created if missing, chmod 0755) for device
    /// [`DEFAULT_DEVICE_ID`] of organisation [`DEFAULT_ORG`].
    pub fn generate(dir: &Path) -> Result<TestPki> {
        Self::generate_for(dir, DEFAULT_DEVICE_ID, DEFAULT_ORG)
    }

    /// [`generate`](Self::generate) with the client certificates' CN (`device_id`) and O
    /// (`org`, alphanumeric for rumqttd) given.
    pub fn generate_for(dir: &Path, device_id: &str, org: &str) -> Result<TestPki> {
        if org.is_empty() || !org.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!("org {org:?} must be alphanumeric (rumqttd tenant id)").into());
        }
        fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .context(|| format!("chmod 0755 {}", dir.display()))?;
        let w = Writer { dir };

        let (ca_pem, ca_issuer) = make_ca(CA_NAME)?;
        let ca = w.file("ca.pem", &ca_pem)?;
        let (wrong_ca_pem, wrong_issuer) = make_ca("edgesync WRONG test CA")?;
        let wrong_ca = w.file("wrong-ca.pem", &wrong_ca_pem)?;

        let good_names = ["localhost", "127.0.0.1"];
        let (server_cert, server_key) =
            w.pair("server", &server_params(&good_names, false)?, &ca_issuer)?;
        let (wrong_ca_server_cert, wrong_ca_server_key) = w.pair(
            "wrong-ca-server",
            &server_params(&good_names, false)?,
            &wrong_issuer,
        )?;
        let (wrong_name_server_cert, wrong_name_server_key) = w.pair(
            "wrong-name-server",
            &server_params(&[WRONG_NAME], false)?,
            &ca_issuer,
        )?;
        let (expired_server_cert, expired_server_key) = w.pair(
            "expired-server",
            &server_params(&good_names, true)?,
            &ca_issuer,
        )?;

        let client = client_params(device_id, org, false, false);
        let client_key_pair = KeyPair::generate().context(|| "generating client key".into())?;
        let client_cert = w.file(
            "client.pem",
            &client
                .signed_by(&client_key_pair, &ca_issuer)
                .context(|| "signing client cert".into())?
                .pem(),
        )?;
        let client_key = w.file("client.key", &client_key_pair.serialize_pem())?;
        let sec1 = pkcs8_ec_to_sec1(client_key_pair.serialized_der())?;
        let client_key_sec1 = w.file("client-sec1.key", &pem_encode("EC PRIVATE KEY", sec1))?;

        let (client_rsa_cert, client_rsa_key_pkcs8, client_rsa_key_pkcs1) =
            match generate_rsa_pkcs8_pem(dir)? {
                Some(rsa_pem) => {
                    let rsa = KeyPair::from_pem_and_sign_algo(&rsa_pem, &PKCS_RSA_SHA256)
                        .context(|| "loading the RSA key made by openssl".into())?;
                    let cert = client_params(device_id, org, false, true)
                        .signed_by(&rsa, &ca_issuer)
                        .context(|| "signing RSA client cert".into())?;
                    let cert = w.file("client-rsa.pem", &cert.pem())?;
                    let pkcs8 = w.file("client-rsa-pkcs8.key", &rsa.serialize_pem())?;
                    let pkcs1 = pkcs8_rsa_to_pkcs1(rsa.serialized_der())?;
                    let pkcs1 = w.file(
                        "client-rsa-pkcs1.key",
                        &pem_encode("RSA PRIVATE KEY", pkcs1),
                    )?;
                    (Some(cert), Some(pkcs8), Some(pkcs1))
                }
                None => (None, None, None),
            };

        let (wrong_ca_client_cert, wrong_ca_client_key) = w.pair(
            "wrong-ca-client",
            &client_params(device_id, org, false, false),
            &wrong_issuer,
        )?;
        let (expired_client_cert, expired_client_key) = w.pair(
            "expired-client",
            &client_params(device_id, org, true, false),
            &ca_issuer,
        )?;

        // ca -> intermediate 1 -> ... -> intermediate N -> leaf.
        let mut intermediates = Vec::new();
        let mut last: Option<Issuer<'static, KeyPair>> = None;
        for i in 1..=CHAIN_INTERMEDIATES {
            let cn = format!("edgesync test intermediate {i}");
            let (pem, next) = make_intermediate(&cn, last.as_ref().unwrap_or(&ca_issuer))?;
            intermediates.push(pem);
            last = Some(next);
        }
        let last = last.as_ref().unwrap_or(&ca_issuer);
        let bundle: String = intermediates.iter().rev().map(String::as_str).collect();
        let (chain_server_cert, chain_server_key) = w.pair_with(
            "chain-server",
            &server_params(&good_names, false)?,
            last,
            &bundle,
        )?;
        let (chain_client_cert, chain_client_key) = w.pair_with(
            "chain-client",
            &client_params(device_id, org, false, false),
            last,
            &bundle,
        )?;

        Ok(TestPki {
            dir: dir.to_path_buf(),
            device_id: device_id.to_owned(),
            org: org.to_owned(),
            ca,
            server_cert,
            server_key,
            client_cert,
            client_key,
            client_key_sec1,
            client_rsa_cert,
            client_rsa_key_pkcs8,
            client_rsa_key_pkcs1,
            wrong_ca,
            wrong_ca_server_cert,
            wrong_ca_server_key,
            wrong_ca_client_cert,
            wrong_ca_client_key,
            wrong_name_server_cert,
            wrong_name_server_key,
            expired_server_cert,
            expired_server_key,
            expired_client_cert,
            expired_client_key,
            chain_server_cert,
            chain_server_key,
            chain_client_cert,
            chain_client_key,
            ca_issuer,
        })
    }

    /// The (certificate, key) files of the chosen server certificate.
    pub fn server_pair(&self, which: ServerCert) -> (&Path, &Path) {
        match which {
            ServerCert::Good => (&self.server_cert, &self.server_key),
            ServerCert::WrongCa => (&self.wrong_ca_server_cert, &self.wrong_ca_server_key),
            ServerCert::WrongName => (&self.wrong_name_server_cert, &self.wrong_name_server_key),
            ServerCert::Expired => (&self.expired_server_cert, &self.expired_server_key),
            ServerCert::Chain => (&self.chain_server_cert, &self.chain_server_key),
        }
    }

    /// Issues one more client certificate by `ca` (EC P-256, PKCS#8 key) for another
    /// device, written as `<file_stem>.pem` / `<file_stem>.key`. Returns (cert, key).
    pub fn issue_client(&self, file_stem: &str, device_id: &str) -> Result<(PathBuf, PathBuf)> {
        Writer { dir: &self.dir }.pair(
            file_stem,
            &client_params(device_id, &self.org, false, false),
            &self.ca_issuer,
        )
    }
}

struct Writer<'a> {
    dir: &'a Path,
}

impl Writer<'_> {
    /// Writes `name` with mode 0644 (0600 for a client key) and returns its path.
    fn file(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        let mode = if name.ends_with(".key") && !name.contains("server") {
            0o600
        } else {
            0o644
        };
        fs::write(&path, contents).context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .context(|| format!("chmod {mode:04o} {}", path.display()))?;
        Ok(path)
    }

    /// A fresh EC P-256 key and a certificate for it signed by `issuer`: `stem.pem`, `stem.key`.
    fn pair(
        &self,
        stem: &str,
        params: &CertificateParams,
        issuer: &Issuer<'_, KeyPair>,
    ) -> Result<(PathBuf, PathBuf)> {
        self.pair_with(stem, params, issuer, "")
    }

    /// As [`pair`](Self::pair), with `chain` (PEM certificates) after the leaf in `stem.pem`.
    fn pair_with(
        &self,
        stem: &str,
        params: &CertificateParams,
        issuer: &Issuer<'_, KeyPair>,
        chain: &str,
    ) -> Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate().context(|| format!("generating key for {stem}"))?;
        let cert = params
            .signed_by(&key, issuer)
            .context(|| format!("signing {stem}"))?;
        let cert = self.file(&format!("{stem}.pem"), &(cert.pem() + chain))?;
        let key = self.file(&format!("{stem}.key"), &key.serialize_pem())?;
        Ok((cert, key))
    }
}

fn make_ca(cn: &str) -> Result<(String, Issuer<'static, KeyPair>)> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "edgesync tests");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = date_time_ymd(2024, 1, 1);
    params.not_after = date_time_ymd(2124, 1, 1);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .context(|| format!("generating key for {cn}"))?;
    let cert = params
        .self_signed(&key)
        .context(|| format!("self-signing {cn}"))?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

/// An intermediate CA `cn` issued by `issuer`.
fn make_intermediate(
    cn: &str,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, Issuer<'static, KeyPair>)> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "edgesync tests");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, false);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .context(|| format!("generating key for {cn}"))?;
    let cert = params
        .signed_by(&key, issuer)
        .context(|| format!("signing {cn}"))?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

fn validity(params: &mut CertificateParams, expired: bool) {
    if expired {
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2021, 1, 1);
    } else {
        params.not_before = date_time_ymd(2024, 1, 1);
        params.not_after = date_time_ymd(2124, 1, 1);
    }
}

fn server_params(names: &[&str], expired: bool) -> Result<CertificateParams> {
    let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    let mut params =
        CertificateParams::new(names.clone()).context(|| format!("server names {names:?}"))?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, expired);
    Ok(params)
}

fn client_params(device_id: &str, org: &str, expired: bool, rsa: bool) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, device_id);
    params
        .distinguished_name
        .push(DnType::OrganizationName, org);
    params.key_usages = if rsa {
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ]
    } else {
        vec![KeyUsagePurpose::DigitalSignature]
    };
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, expired);
    params
}

/// An RSA-2048 key as PKCS#8 PEM, made by the `openssl` program (ring, the only crypto
/// provider allowed here, cannot generate RSA keys). `None`, with a notice on stderr, when
/// `openssl` is not installed.
fn generate_rsa_pkcs8_pem(dir: &Path) -> Result<Option<String>> {
    let out = dir.join("client-rsa.openssl-tmp");
    let status = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output();
    match status {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "openssl not installed: skipping the RSA (PKCS#1) client key of the test PKI"
            );
            Ok(None)
        }
        Err(e) => Err(format!("running openssl genpkey: {e}").into()),
        Ok(o) if !o.status.success() => Err(format!(
            "openssl genpkey failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )
        .into()),
        Ok(_) => {
            let pem = fs::read_to_string(&out).context(|| format!("reading {}", out.display()))?;
            fs::remove_file(&out).context(|| format!("removing {}", out.display()))?;
            Ok(Some(pem))
        }
    }
}

fn pem_encode(tag: &str, der: Vec<u8>) -> String {
    pem::encode(&pem::Pem::new(tag, der))
}

// --- Minimal DER handling: enough to unwrap PKCS#8 into PKCS#1 / SEC1. ---

const TAG_SEQUENCE: u8 = 0x30;
const TAG_INTEGER: u8 = 0x02;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_OID: u8 = 0x06;
const TAG_CONTEXT_0: u8 = 0xa0;
const TAG_CONTEXT_1: u8 = 0xa1;
/// 1.2.840.10045.2.1 id-ecPublicKey
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// 1.2.840.113549.1.1.1 rsaEncryption
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// One DER element: its tag, its contents and the whole encoding (header included).
struct Tlv<'a> {
    tag: u8,
    value: &'a [u8],
    raw: &'a [u8],
}

/// Reads one element off the front of `input`; returns it and the rest.
fn read_tlv(input: &[u8]) -> Result<(Tlv<'_>, &[u8])> {
    let bad = || -> crate::Error { "malformed DER".into() };
    let (&tag, rest) = input.split_first().ok_or_else(bad)?;
    let (&first, mut rest) = rest.split_first().ok_or_else(bad)?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(bad());
        }
        let (bytes, r) = rest.split_at(n);
        rest = r;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return Err(bad());
    }
    let header = input.len() - rest.len();
    let (value, rest) = rest.split_at(len);
    Ok((
        Tlv {
            tag,
            value,
            raw: &input[..header + len],
        },
        rest,
    ))
}

fn expect_tlv<'a>(input: &'a [u8], tag: u8, what: &str) -> Result<(Tlv<'a>, &'a [u8])> {
    let (tlv, rest) = read_tlv(input).context(|| format!("reading {what}"))?;
    if tlv.tag != tag {
        return Err(format!("{what}: expected tag {tag:#04x}, found {:#04x}", tlv.tag).into());
    }
    Ok((tlv, rest))
}

fn encode_tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(value);
    out
}

/// Splits a PKCS#8 PrivateKeyInfo into (algorithm OID, algorithm parameters element,
/// inner private key bytes).
fn parse_pkcs8(der: &[u8]) -> Result<(&[u8], Option<Tlv<'_>>, &[u8])> {
    let (info, _) = expect_tlv(der, TAG_SEQUENCE, "PrivateKeyInfo")?;
    let (_version, rest) = expect_tlv(info.value, TAG_INTEGER, "PKCS#8 version")?;
    let (alg, rest) = expect_tlv(rest, TAG_SEQUENCE, "PKCS#8 algorithm")?;
    let (oid, params) = expect_tlv(alg.value, TAG_OID, "PKCS#8 algorithm OID")?;
    let params = if params.is_empty() {
        None
    } else {
        Some(read_tlv(params)?.0)
    };
    let (key, _) = expect_tlv(rest, TAG_OCTET_STRING, "PKCS#8 privateKey")?;
    Ok((oid.value, params, key.value))
}

/// PKCS#8 (RSA) → PKCS#1 RSAPrivateKey: the inner key is already PKCS#1.
fn pkcs8_rsa_to_pkcs1(der: &[u8]) -> Result<Vec<u8>> {
    let (oid, _, key) = parse_pkcs8(der)?;
    if oid != OID_RSA_ENCRYPTION {
        return Err("PKCS#8 key is not RSA".into());
    }
    Ok(key.to_vec())
}

/// PKCS#8 (EC) → SEC1 ECPrivateKey (RFC 5915), with the curve OID in `[0] parameters` as
/// RFC 5915 requires (ring's PKCS#8 leaves it out of the inner key).
fn pkcs8_ec_to_sec1(der: &[u8]) -> Result<Vec<u8>> {
    let (oid, curve, key) = parse_pkcs8(der)?;
    if oid != OID_EC_PUBLIC_KEY {
        return Err("PKCS#8 key is not EC".into());
    }
    let curve = curve.ok_or("PKCS#8 EC key without curve OID")?;
    let (ec, _) = expect_tlv(key, TAG_SEQUENCE, "ECPrivateKey")?;
    let (version, rest) = expect_tlv(ec.value, TAG_INTEGER, "ECPrivateKey version")?;
    let (secret, mut rest) = expect_tlv(rest, TAG_OCTET_STRING, "ECPrivateKey privateKey")?;
    let mut params = None;
    let mut public = None;
    while !rest.is_empty() {
        let (tlv, r) = read_tlv(rest)?;
        match tlv.tag {
            TAG_CONTEXT_0 => params = Some(tlv.raw.to_vec()),
            TAG_CONTEXT_1 => public = Some(tlv.raw.to_vec()),
            other => return Err(format!("unexpected ECPrivateKey field {other:#04x}").into()),
        }
        rest = r;
    }
    let mut body = Vec::new();
    body.extend_from_slice(version.raw);
    body.extend_from_slice(secret.raw);
    body.extend(params.unwrap_or_else(|| encode_tlv(TAG_CONTEXT_0, curve.raw)));
    if let Some(public) = public {
        body.extend(public);
    }
    Ok(encode_tlv(TAG_SEQUENCE, &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_tlv_long_lengths_round_trip() {
        let value = vec![7u8; 300];
        let enc = encode_tlv(TAG_OCTET_STRING, &value);
        assert_eq!(&enc[..4], &[0x04, 0x82, 0x01, 0x2c]);
        let (tlv, rest) = read_tlv(&enc).unwrap();
        assert!(rest.is_empty());
        assert_eq!(tlv.value, &value[..]);
        assert_eq!(tlv.raw, &enc[..]);
    }

    #[test]
    fn truncated_der_is_an_error() {
        assert!(read_tlv(&[0x30, 0x05, 0x01]).is_err());
        assert!(read_tlv(&[]).is_err());
    }

    #[test]
    fn sec1_conversion_keeps_the_secret_and_adds_the_curve() {
        let key = KeyPair::generate().unwrap();
        let sec1 = pkcs8_ec_to_sec1(key.serialized_der()).unwrap();
        let (ec, _) = read_tlv(&sec1).unwrap();
        assert_eq!(ec.tag, TAG_SEQUENCE);
        let (_, rest) = read_tlv(ec.value).unwrap();
        let (secret, rest) = read_tlv(rest).unwrap();
        assert_eq!(secret.value.len(), 32);
        let (params, rest) = read_tlv(rest).unwrap();
        assert_eq!(params.tag, TAG_CONTEXT_0);
        // prime256v1 = 1.2.840.10045.3.1.7
        assert_eq!(
            params.value,
            &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
        );
        let (public, rest) = read_tlv(rest).unwrap();
        assert_eq!(public.tag, TAG_CONTEXT_1);
        assert!(rest.is_empty());
    }

    #[test]
    fn rsa_conversion_refuses_an_ec_key() {
        let key = KeyPair::generate().unwrap();
        assert!(pkcs8_rsa_to_pkcs1(key.serialized_der()).is_err());
    }
}
