//! How a replica reaches PostgreSQL: `DIGIBOT_DATABASE_URL` parsed once
//! into a [`DatabaseUrl`], the rustls connector its `sslmode` asks for, and
//! what every connection starts with (a `statement_timeout`, TCP
//! keepalives), sent in the startup packet so it costs no round trip.
//!
//! `sslmode` and `sslrootcert` mean what they mean to libpq (tokio-postgres
//! itself knows neither `verify-ca` nor `verify-full` nor root
//! certificates, so they are taken out of the URL here):
//!
//! | sslmode | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | – |
//! | `prefer` (default) | when the server offers it | not checked |
//! | `require` | always; a plaintext-only server is refused | not checked, unless `sslrootcert` is given: then as `verify-ca` |
//! | `verify-ca` | always | signed by a trusted root |
//! | `verify-full` | always | signed by a trusted root, and names the host |
//!
//! Trusted roots: the certificates in the PEM file `sslrootcert=PATH` (and
//! only those, as with libpq), else the system's (`sslrootcert=system`
//! says so explicitly).

use digibot_store::StoreError;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Config;
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How much transport security a connection must have (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, StoreError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(url_error(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                )));
            }
        })
    }
}

/// Which certificates are trusted to sign the server's.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    System,
    File(PathBuf),
}

/// A `postgres://` URL, parsed: where the database is, and how to reach it.
/// Its `Debug` never shows the password.
#[derive(Clone)]
pub struct DatabaseUrl {
    config: Config,
    ssl: SslMode,
    roots: Option<Roots>,
    /// The query keys the URL set itself (its own settings win over ours).
    given: Vec<String>,
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseUrl")
            .field("hosts", &self.config.get_hosts())
            .field("ports", &self.config.get_ports())
            .field("dbname", &self.config.get_dbname())
            .field("user", &self.config.get_user())
            .field("ssl", &self.ssl)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

fn url_error(why: String) -> StoreError {
    StoreError::Config(format!("DIGIBOT_DATABASE_URL: {why}"))
}

impl DatabaseUrl {
    /// Parses `postgres://user:password@host:port/db?sslmode=...`; the
    /// error never contains the password.
    pub fn parse(url: &str) -> Result<DatabaseUrl, StoreError> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut ssl = SslMode::Prefer;
        let mut roots = None;
        let mut rest = Vec::new();
        let mut given = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| url_error(format!("{key}: not UTF-8")))?;
            match key {
                "sslmode" => ssl = SslMode::parse(&value)?,
                "sslrootcert" if value == "system" => roots = Some(Roots::System),
                "sslrootcert" if value.is_empty() => {
                    return Err(url_error("sslrootcert is empty".into()));
                }
                "sslrootcert" => roots = Some(Roots::File(PathBuf::from(value.as_ref()))),
                _ => rest.push(pair),
            }
            given.push(key.to_string());
        }
        let url = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let mut config = url
            .parse::<Config>()
            .map_err(|e| url_error(crate::describe(&e)))?;
        config.ssl_mode(match ssl {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        });
        Ok(DatabaseUrl {
            config,
            ssl,
            roots,
            given,
        })
    }

    /// The same server, another database (tests make one each).
    pub fn with_dbname(&self, name: &str) -> DatabaseUrl {
        let mut url = self.clone();
        url.config.dbname(name);
        url
    }

    /// The `sslmode` the URL asked for.
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl
    }

    fn given(&self, key: &str) -> bool {
        self.given.iter().any(|k| k == key)
    }

    /// The connection settings with digibot's session settings and
    /// keepalives added where the URL did not set its own.
    pub(crate) fn session(&self, statement_timeout: Duration) -> Config {
        let mut config = self.config.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("digibot");
        }
        // A dead peer is noticed in about a minute rather than the
        // kernel's two hours (or the fifteen minutes of retransmissions).
        if !self.given("keepalives_idle") {
            config.keepalives_idle(Duration::from_secs(30));
        }
        if !self.given("keepalives_interval") {
            config.keepalives_interval(Duration::from_secs(10));
        }
        if !self.given("keepalives_retries") {
            config.keepalives_retries(3);
        }
        if !self.given("tcp_user_timeout") {
            config.tcp_user_timeout(Duration::from_secs(30));
        }
        let options = config.get_options().unwrap_or_default().to_string();
        if !options.contains("statement_timeout") {
            let ms = statement_timeout.as_millis().max(1);
            config.options(format!("{options} -c statement_timeout={ms}").trim());
        }
        config
    }

    /// The TLS connector `sslmode` asks for (unused with `disable`).
    pub(crate) fn tls(&self) -> Result<MakeRustlsConnect, StoreError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error(e.to_string()))?;
        let check = match (self.ssl, &self.roots) {
            (SslMode::VerifyFull, _) => Check::Full,
            (SslMode::VerifyCa, _) | (SslMode::Require, Some(_)) => Check::Chain,
            _ => Check::Nothing,
        };
        let config = match check {
            Check::Nothing => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
                .with_no_client_auth(),
            Check::Chain | Check::Full => {
                let roots = Arc::new(self.root_store()?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| tls_error(e.to_string()))?;
                let verifier: Arc<dyn ServerCertVerifier> = match check {
                    Check::Full => webpki,
                    _ => Arc::new(ChainOnly(webpki)),
                };
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth()
            }
        };
        Ok(MakeRustlsConnect::new(config))
    }

    fn root_store(&self) -> Result<RootCertStore, StoreError> {
        let mut store = RootCertStore::empty();
        match self.roots.as_ref().unwrap_or(&Roots::System) {
            Roots::File(path) => {
                let shown = path.display();
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| tls_error(format!("sslrootcert={shown}: {e}")))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| tls_error(format!("sslrootcert={shown}: {e}")))?;
                let (added, _) = store.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(tls_error(format!(
                        "sslrootcert={shown} holds no usable certificate"
                    )));
                }
            }
            Roots::System => {
                let found = rustls_native_certs::load_native_certs();
                store.add_parsable_certificates(found.certs);
                if store.is_empty() {
                    return Err(tls_error(
                        "no system root certificates found: give sslrootcert=PATH".into(),
                    ));
                }
            }
        }
        Ok(store)
    }
}

fn tls_error(why: String) -> StoreError {
    StoreError::Config(format!("DIGIBOT_DATABASE_URL: TLS: {why}"))
}

/// How much of the server's certificate is checked.
#[derive(Clone, Copy)]
enum Check {
    Nothing,
    Chain,
    Full,
}

/// `prefer` and `require` without roots, as libpq does them: encrypted,
/// the handshake's signatures checked, the certificate itself not.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain up to a trusted root is checked, the host name
/// is not (webpki checks the chain first, so a wrong name means a good
/// chain).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_ssl_keys_are_taken_out_and_the_rest_passes_through() {
        let url = DatabaseUrl::parse(
            "postgres://u:secret@db.example:6543/app?sslmode=verify-full&sslrootcert=/etc/ca%20dir/ca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(url.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(
            url.roots,
            Some(Roots::File(PathBuf::from("/etc/ca dir/ca.pem")))
        );
        assert_eq!(url.config.get_application_name(), Some("x"));
        assert_eq!(url.config.get_ssl_mode(), PgSslMode::Require);
        assert_eq!(url.config.get_ports(), &[6543]);
        let shown = format!("{url:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn default_is_prefer_and_bad_modes_are_refused() {
        let url = DatabaseUrl::parse("postgres://u@h/db").unwrap();
        assert_eq!(url.ssl_mode(), SslMode::Prefer);
        assert_eq!(url.config.get_ssl_mode(), PgSslMode::Prefer);
        let disabled = DatabaseUrl::parse("postgres://u@h/db?sslmode=disable").unwrap();
        assert_eq!(disabled.config.get_ssl_mode(), PgSslMode::Disable);
        for bad in ["allow", "verify_full", ""] {
            let e = DatabaseUrl::parse(&format!("postgres://u:pw@h/db?sslmode={bad}")).unwrap_err();
            assert!(e.to_string().contains("sslmode"), "{e}");
        }
        let e = DatabaseUrl::parse("postgres://u:hunter2@h/db?nonsense=1").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn session_settings_are_added_unless_the_url_has_its_own() {
        let url = DatabaseUrl::parse("postgres://u@h/db").unwrap();
        let config = url.session(Duration::from_millis(1500));
        assert_eq!(config.get_options(), Some("-c statement_timeout=1500"));
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(config.get_application_name(), Some("digibot"));

        let own = DatabaseUrl::parse(
            "postgres://u@h/db?options=-c%20statement_timeout%3D90&keepalives_idle=7&connect_timeout=2",
        )
        .unwrap();
        let config = own.session(Duration::from_millis(1500));
        assert_eq!(config.get_options(), Some("-c statement_timeout=90"));
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(7));
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(2)));
    }

    #[test]
    fn a_missing_or_empty_root_file_is_a_clear_error() {
        let url = DatabaseUrl::parse(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        )
        .unwrap();
        let e = url.tls().err().unwrap();
        assert!(
            e.to_string().contains("sslrootcert=/nonexistent/ca.pem"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let url = DatabaseUrl::parse(&format!(
            "postgres://u@h/db?sslmode=verify-ca&sslrootcert={}",
            empty.display()
        ))
        .unwrap();
        let e = url.tls().err().unwrap();
        assert!(e.to_string().contains("no usable certificate"), "{e}");
    }
}
