//! TLS for both legs: the listener (rustls, TLS 1.2/1.3, ALPN http/1.1) and `wss://` upstreams.
//!
//! Providers are passed explicitly instead of installed process-wide, so that tests and the
//! binary can build configs any number of times in any order.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// A listener config from PEM certificate chains and private keys. With several, the one whose
/// certificate is valid for the client's SNI name is chosen; the first is the default (no SNI,
/// or a name none of them covers). An error names the pair (by index) it is about.
pub fn server_config<'a>(
    pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<Arc<ServerConfig>, (usize, String)> {
    let provider = provider();
    let mut certified = Vec::new();
    for (index, (cert_pem, key_pem)) in pairs.into_iter().enumerate() {
        certified.push(Arc::new(
            certified_key(cert_pem, key_pem, &provider).map_err(|e| (index, e))?,
        ));
    }
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|e| (0, format!("TLS setup failed: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { certified }));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate file is not valid PEM: {e}"))?;
    if chain.is_empty() {
        return Err("certificate file holds no CERTIFICATE block".into());
    }
    webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| {
        format!("the first certificate is not a usable end-entity certificate: {e}")
    })?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("private key file holds no usable PEM private key: {e}"))?;
    CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| format!("certificate and key do not make a usable pair: {e}"))
}

#[derive(Debug)]
struct SniResolver {
    certified: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello
            .server_name()
            .and_then(|name| ServerName::try_from(name.to_owned()).ok());
        if let Some(name) = name {
            let fits = |key: &&Arc<CertifiedKey>| {
                key.cert.first().is_some_and(|leaf| {
                    webpki::EndEntityCert::try_from(leaf)
                        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
                })
            };
            if let Some(key) = self.certified.iter().find(fits) {
                return Some(key.clone());
            }
        }
        self.certified.first().cloned()
    }
}

pub fn root_store_from_pem(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("CA file is not valid PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("CA file holds an unusable certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("CA file holds no CERTIFICATE block".into());
    }
    Ok(roots)
}

/// The operating system's trust store. Unreadable entries are skipped: one bad file in
/// /etc/ssl/certs should not stop the edge from reaching an upstream signed by a good one.
pub fn native_root_store() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::warn!(%error, "skipping an unreadable system CA certificate");
    }
    roots.add_parsable_certificates(found.certs);
    roots
}

pub fn client_config(roots: Arc<RootCertStore>) -> Result<Arc<ClientConfig>, String> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How a route reaches its `wss://` upstreams.
#[derive(Clone)]
pub struct UpstreamTls {
    pub config: Arc<ClientConfig>,
    /// Overrides the name checked in the upstream's certificate (default: the URL's host).
    pub server_name: Option<ServerName<'static>>,
}
