//! The signature checks behind `jsonwebtoken`: only the three algorithms the edge accepts,
//! verification only.
//!
//! `jsonwebtoken`'s own RustCrypto provider links every algorithm it knows, signing included
//! (P-384, Ed25519, RSA-PSS, RSA signing with blinding): +196 KB gzip of wasm, half again the
//! whole worker. Its `CryptoProvider` hook lets the edge plug in just HS256 (`hmac`/`sha2`,
//! already in the bundle for sync signatures), ES256 (`p256`) and RS256 (`rsa`, PKCS#1 v1.5).
//! Anything else — including any signing — is an error, never a panic.

use hmac::{Hmac, Mac};
use jsonwebtoken::crypto::{CryptoProvider, JwkUtils, JwtSigner, JwtVerifier};
use jsonwebtoken::errors::{ErrorKind, Result};
use jsonwebtoken::jwk::ThumbprintHash;
use jsonwebtoken::signature::{Error as SignatureError, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use sha2::{Digest, Sha256};

/// Installs the edge's provider as the process default (once; later calls do nothing).
pub(super) fn install() {
    // Err: already installed, by an earlier call
    let _ = PROVIDER.install_default();
}

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: no_signer,
    verifier_factory: verifier,
    jwk_utils: JwkUtils {
        extract_rsa_public_key_components: |_| Err(ErrorKind::InvalidKeyFormat.into()),
        extract_ec_public_key_coordinates: |_, _| Err(ErrorKind::InvalidKeyFormat.into()),
        compute_digest: thumbprint_digest,
    },
};

/// Only reached by JWK thumbprints, which the edge never computes.
fn thumbprint_digest(data: &[u8], _hash: ThumbprintHash) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

fn no_signer(_: &Algorithm, _: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
    Err(ErrorKind::InvalidAlgorithm.into())
}

fn verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    let family = key.family();
    match (algorithm, family, key.kind()) {
        (Algorithm::HS256, AlgorithmFamily::Hmac, DecodingKeyKind::SecretOrDer(secret)) => {
            let mac =
                Hmac::<Sha256>::new_from_slice(secret).map_err(|_| ErrorKind::InvalidKeyFormat)?;
            Ok(Box::new(Hs256(mac)))
        }
        (Algorithm::ES256, AlgorithmFamily::Ec, DecodingKeyKind::SecretOrDer(sec1)) => {
            let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(sec1)
                .map_err(|_| ErrorKind::InvalidEcdsaKey)?;
            Ok(Box::new(Es256(key)))
        }
        (Algorithm::RS256, AlgorithmFamily::Rsa, DecodingKeyKind::RsaModulusExponent { n, e }) => {
            let key = rsa::RsaPublicKey::new(
                rsa::BigUint::from_bytes_be(n),
                rsa::BigUint::from_bytes_be(e),
            )
            .map_err(|e| ErrorKind::InvalidRsaKey(e.to_string()))?;
            Ok(Box::new(Rs256(key)))
        }
        // another algorithm, or a key of another family (algorithm confusion)
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    }
}

struct Hs256(Hmac<Sha256>);
struct Es256(p256::ecdsa::VerifyingKey);
struct Rs256(rsa::RsaPublicKey);

impl Verifier<Vec<u8>> for Hs256 {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> std::result::Result<(), SignatureError> {
        let mut mac = self.0.clone();
        mac.update(msg);
        // constant-time comparison
        mac.verify_slice(signature)
            .map_err(SignatureError::from_source)
    }
}

impl Verifier<Vec<u8>> for Es256 {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> std::result::Result<(), SignatureError> {
        // JWS carries ECDSA signatures as r || s, 64 bytes (RFC 7518 §3.4), not DER
        let signature = p256::ecdsa::Signature::from_slice(signature)?;
        p256::ecdsa::signature::Verifier::verify(&self.0, msg, &signature)
            .map_err(SignatureError::from_source)
    }
}

impl Verifier<Vec<u8>> for Rs256 {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> std::result::Result<(), SignatureError> {
        self.0
            .verify(
                rsa::Pkcs1v15Sign::new::<Sha256>(),
                &Sha256::digest(msg),
                signature,
            )
            // rsa's error is not `std::error::Error` without its `std` feature; the reason is
            // always "does not verify" here anyway
            .map_err(|_| SignatureError::new())
    }
}

impl JwtVerifier for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

impl JwtVerifier for Es256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::ES256
    }
}

impl JwtVerifier for Rs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::RS256
    }
}
