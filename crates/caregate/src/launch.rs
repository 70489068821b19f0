//! Starting `caregate serve` as a child process on a loopback copy of a configuration, and getting
//! partner access tokens from it with the example ICS's demo keys. Shared by `caregate bench` and
//! `caregate demo`, which both drive the real server over TLS from outside its process.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use caregate_testkit::keys::{KeyAlg, PartnerKey};

/// Make relative paths in the config absolute against its directory (keys named `*_file`,
/// `*_dir`, `*_path`, `cert`, `key`, `client_ca`, `ca_cert`, `client_cert`, `client_key`,
/// `definitions`, `ndoo_list`), so a copy of it works from another directory.
pub(crate) fn absolutise(value: &mut toml::Value, base: &Path) {
    match value {
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                let is_path = key.ends_with("_file")
                    || key.ends_with("_dir")
                    || key.ends_with("_path")
                    || matches!(
                        key.as_str(),
                        "cert"
                            | "key"
                            | "client_ca"
                            | "ca_cert"
                            | "client_cert"
                            | "client_key"
                            | "definitions"
                            | "ndoo_list"
                            | "dir"
                            | "path"
                    );
                match item {
                    toml::Value::String(s) if is_path && Path::new(s.as_str()).is_relative() => {
                        *s = base.join(s.as_str()).display().to_string();
                    }
                    other => absolutise(other, base),
                }
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(|item| absolutise(item, base)),
        _ => {}
    }
}

/// A configuration file read as TOML with its relative paths made absolute, and the directory
/// they were resolved against (where the example's `keys/` folder is).
#[derive(Debug, Clone)]
pub(crate) struct LoadedConfig {
    pub(crate) value: toml::Value,
    pub(crate) dir: PathBuf,
}

impl LoadedConfig {
    pub(crate) fn load(config: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(config)
            .with_context(|| format!("cannot read {}", config.display()))?;
        let mut value: toml::Value =
            toml::from_str(&text).with_context(|| format!("{} is not TOML", config.display()))?;
        let dir = config
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."))
            .canonicalize()
            .with_context(|| format!("cannot resolve the directory of {}", config.display()))?;
        absolutise(&mut value, &dir);
        Ok(Self { value, dir })
    }

    /// The `[server]` table, created if missing.
    pub(crate) fn table_mut(&mut self, name: &str) -> anyhow::Result<&mut toml::Table> {
        self.value
            .as_table_mut()
            .context("the config is not a TOML table")?
            .entry(name)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| format!("[{name}] is not a table"))
    }

    /// The `[[partner]]` tables.
    pub(crate) fn partners(&self) -> Vec<toml::Value> {
        self.value
            .get("partner")
            .and_then(toml::Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    /// The `[[partner]]` table with this id.
    pub(crate) fn partner_mut(&mut self, id: &str) -> anyhow::Result<&mut toml::Table> {
        self.value
            .get_mut("partner")
            .and_then(toml::Value::as_array_mut)
            .and_then(|partners| {
                partners
                    .iter_mut()
                    .find(|p| p.get("id").and_then(toml::Value::as_str) == Some(id))
            })
            .and_then(toml::Value::as_table_mut)
            .with_context(|| format!("the config has no partner {id}"))
    }

    pub(crate) fn write(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, toml::to_string(&self.value)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// A `caregate serve` child process, listening.
#[derive(Debug)]
pub(crate) struct GatewayProcess {
    child: Child,
    pub(crate) base_url: String,
    /// The dev-mode certificate to trust (PEM).
    pub(crate) cert_pem: Vec<u8>,
}

impl GatewayProcess {
    /// Start `caregate serve --config CONFIG` (this same executable) and wait until it listens.
    /// Its log goes to `log` (appended) when given, else to this process's standard error.
    pub(crate) fn spawn(
        config: &Path,
        log_level: &str,
        log: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("cannot open {}", path.display()))?,
            ),
            None => Stdio::inherit(),
        };
        let mut child = std::process::Command::new(exe)
            .args(["serve", "--config"])
            .arg(config)
            .env("CAREGATE_LOG", log_level)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("cannot start caregate serve")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let (mut base_url, mut cert) = (None, None);
        for line in lines.by_ref() {
            let line = line?;
            if let Some(path) = line.strip_prefix("dev certificate (trust it in clients): ") {
                cert = Some(PathBuf::from(path));
            }
            if let Some(url) = line.strip_prefix("caregate listening on ") {
                base_url = Some(url.to_owned());
                break;
            }
        }
        // Keep draining so the gateway never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let Some(base_url) = base_url else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the gateway exited before it listened (see {})",
                log.map_or("its log above".to_owned(), |p| p.display().to_string())
            );
        };
        let cert_pem = match cert {
            Some(path) => {
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the config names its own TLS certificate; use --url and --ca-cert")
            }
        };
        Ok(Self {
            child,
            base_url,
            cert_pem,
        })
    }

    pub(crate) fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// SIGTERM, then wait up to `grace` for a clean exit (SIGKILL after). True if it exited 0.
    pub(crate) fn stop(mut self, grace: Duration) -> bool {
        let pid = self.pid();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

/// A gateway left running when its owner returns early (an error part-way through `demo` or
/// `bench`) is killed, never orphaned.
impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A partner's demo credentials: its registered scopes and its private key from `keys/`.
#[derive(Debug)]
pub(crate) struct PartnerCredentials {
    pub(crate) id: String,
    pub(crate) scopes: Vec<String>,
    key: PartnerKey,
}

impl PartnerCredentials {
    /// Read partner `id`'s scopes and JWKS from the config and its private key from
    /// `<config dir>/keys/<id>.key.pem` (the example's demo keys).
    pub(crate) fn load(config: &LoadedConfig, id: &str) -> anyhow::Result<Self> {
        let partners = config.partners();
        let entry = partners
            .iter()
            .find(|p| p.get("id").and_then(toml::Value::as_str) == Some(id))
            .with_context(|| format!("the config has no partner {id}"))?;
        let scopes = entry
            .get("scopes")
            .and_then(toml::Value::as_array)
            .map(|s| {
                s.iter()
                    .filter_map(toml::Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let jwks_file = entry
            .get("jwks_file")
            .and_then(toml::Value::as_str)
            .with_context(|| format!("partner {id} has no jwks_file"))?;
        let jwks: serde_json::Value = serde_json::from_slice(
            &std::fs::read(jwks_file).with_context(|| format!("cannot read {jwks_file}"))?,
        )
        .with_context(|| format!("{jwks_file} is not JSON"))?;
        let jwk = &jwks["keys"][0];
        let kid = jwk["kid"].as_str().context("JWK without kid")?;
        let alg = match jwk["alg"].as_str() {
            Some("RS384") => KeyAlg::Rs384,
            Some("ES384") => KeyAlg::Es384,
            Some("ES256") => KeyAlg::Es256,
            other => bail!("{id}: unsupported key algorithm {other:?}"),
        };
        let key_path = config.dir.join("keys").join(format!("{id}.key.pem"));
        let pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?;
        let key = PartnerKey::from_private_pem(kid, alg, &pem)
            .map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))?;
        Ok(Self {
            id: id.to_owned(),
            scopes,
            key,
        })
    }

    /// Exchange a signed client assertion for an access token (SMART Backend Services).
    pub(crate) async fn token(
        &self,
        client: &reqwest::Client,
        base_url: &str,
    ) -> anyhow::Result<String> {
        let token_url = format!("{}/auth/token", base_url.trim_end_matches('/'));
        let assertion = self.key.sign_assertion(&self.id, &token_url);
        let response = client
            .post(&token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion.as_str()),
                ("scope", self.scopes.join(" ").as_str()),
            ])
            .send()
            .await
            .with_context(|| format!("cannot reach {token_url}"))?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let token = body["access_token"]
            .as_str()
            .with_context(|| format!("token for {} refused ({status}): {body}", self.id))?;
        Ok(token.to_owned())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn absolutise_rewrites_relative_paths_only() {
        let mut value: toml::Value = toml::from_str(
            "[server]\ndata_dir = \"data\"\nlisten = \"127.0.0.1:0\"\n[policy]\ndir = \"/abs/policies\"\nndoo_list = \"ndoo.txt\"\n[[partner]]\njwks_file = \"keys/a.json\"\n",
        )
        .unwrap();
        absolutise(&mut value, Path::new("/base"));
        assert_eq!(value["server"]["data_dir"].as_str(), Some("/base/data"));
        assert_eq!(value["server"]["listen"].as_str(), Some("127.0.0.1:0"));
        assert_eq!(value["policy"]["dir"].as_str(), Some("/abs/policies"));
        assert_eq!(
            value["policy"]["ndoo_list"].as_str(),
            Some("/base/ndoo.txt")
        );
        assert_eq!(
            value["partner"][0]["jwks_file"].as_str(),
            Some("/base/keys/a.json")
        );
    }
}
