//! TLS for both legs: the listener (rustls, TLS 1.2/1.3, ALPN http/1.1) and `wss://` upstreams.
//!
//! Providers are passed explicitly instead of installed process-wide, so that tests and the
//! binary can build configs any number of times in any order.

use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// A certificate, key or CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate file is not valid PEM: {0}")]
    CertificatePem(pem::Error),
    #[error("certificate file holds no CERTIFICATE block")]
    NoCertificate,
    #[error("the first certificate is not a usable end-entity certificate: {0}")]
    NotEndEntity(webpki::Error),
    #[error("private key file holds no usable PEM private key: {0}")]
    PrivateKey(pem::Error),
    #[error("certificate and key do not make a usable pair: {0}")]
    Pair(rustls::Error),
    #[error("TLS setup failed: {0}")]
    Setup(rustls::Error),
    #[error("CA file is not valid PEM: {0}")]
    CaPem(pem::Error),
    #[error("CA file holds an unusable certificate: {0}")]
    CaCertificate(rustls::Error),
    #[error("CA file holds no CERTIFICATE block")]
    NoCa,
}

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
) -> Result<Arc<ServerConfig>, (usize, TlsError)> {
    let provider = provider();
    let mut certified = Vec::new();
    for (index, (cert_pem, key_pem)) in pairs.into_iter().enumerate() {
        certified.push(Arc::new(
            certified_key(cert_pem, key_pem, &provider).map_err(|e| (index, e))?,
        ));
    }
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|e| (0, TlsError::Setup(e)))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { certified }));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(TlsError::CertificatePem)?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate);
    };
    webpki::EndEntityCert::try_from(leaf).map_err(TlsError::NotEndEntity)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(TlsError::PrivateKey)?;
    CertifiedKey::from_der(chain, key, provider).map_err(TlsError::Pair)
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

pub(crate) fn root_store_from_pem(pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(TlsError::CaPem)?;
        roots.add(cert).map_err(TlsError::CaCertificate)?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCa);
    }
    Ok(roots)
}

/// The operating system's trust store. Unreadable entries are skipped: one bad file in
/// /etc/ssl/certs should not stop the edge from reaching an upstream signed by a good one.
pub(crate) fn native_root_store() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::warn!(%error, "skipping an unreadable system CA certificate");
    }
    roots.add_parsable_certificates(found.certs);
    roots
}

pub(crate) fn client_config(roots: Arc<RootCertStore>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(TlsError::Setup)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
