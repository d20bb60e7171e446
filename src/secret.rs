//! Holders of key material: data keys, key-encryption keys, derived message keys.
//!
//! Modelled on rustls' `AeadKey`: no `Debug` (so `{:?}` of a struct holding one cannot print key
//! bytes: such structs write their own redacting `Debug`), no `Clone` (a copy is an explicit,
//! greppable `duplicate()`), and the bytes are zeroized when the value is dropped, which is also
//! what happens when a cache evicts the last `Arc` to one. Never log, format or serialize these.

use zeroize::Zeroize;

/// Key bytes that are zeroized on drop and cannot be printed.
pub struct SecretKey {
    bytes: Box<[u8]>,
}

impl SecretKey {
    /// Fresh random key bytes from the OS CSPRNG (through aws-lc's DRBG).
    pub fn generate(len: usize) -> Result<Self, RandomFailed> {
        let mut bytes = vec![0u8; len].into_boxed_slice();
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| RandomFailed)?;
        Ok(Self { bytes })
    }

    /// Takes ownership of bytes without copying them (so no stray copy is left behind).
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        Self {
            bytes: bytes.into_boxed_slice(),
        }
    }

    /// Copies key bytes out of a buffer the caller is responsible for wiping.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self {
            bytes: bytes.to_vec().into_boxed_slice(),
        }
    }

    /// An explicit copy, for the rare places that must hold the same key twice.
    pub fn duplicate(&self) -> Self {
        Self::from_slice(&self.bytes)
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl AsRef<[u8]> for SecretKey {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

/// The system random generator failed; nothing sensible can continue without randomness.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomFailed;

/// Fills a buffer with random bytes (salts, nonces).
pub fn random_fill(buf: &mut [u8]) -> Result<(), RandomFailed> {
    aws_lc_rs::rand::fill(buf).map_err(|_| RandomFailed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compile-time proof that `SecretKey` has neither `Debug` nor `Clone`: if either is ever
    /// implemented, the `<SecretKey as ...>::item` paths below become ambiguous and this module
    /// stops compiling.
    #[test]
    fn secret_key_has_no_debug_and_no_clone() {
        trait AmbiguousIfDebug<A> {
            fn item() {}
        }
        impl<T: ?Sized> AmbiguousIfDebug<()> for T {}
        impl<T: ?Sized + std::fmt::Debug> AmbiguousIfDebug<u8> for T {}
        trait AmbiguousIfClone<A> {
            fn item() {}
        }
        impl<T: ?Sized> AmbiguousIfClone<()> for T {}
        impl<T: Clone> AmbiguousIfClone<u8> for T {}
        <SecretKey as AmbiguousIfDebug<_>>::item();
        <SecretKey as AmbiguousIfClone<_>>::item();
    }

    #[test]
    fn generate_gives_distinct_keys_of_the_asked_length() {
        let a = SecretKey::generate(32).unwrap();
        let b = SecretKey::generate(32).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a.as_ref(), b.as_ref());
        assert_eq!(SecretKey::generate(16).unwrap().len(), 16);
    }

    #[test]
    fn duplicate_is_equal_but_separate() {
        let a = SecretKey::generate(32).unwrap();
        let b = a.duplicate();
        assert_eq!(a.as_ref(), b.as_ref());
        assert_ne!(a.as_ref().as_ptr(), b.as_ref().as_ptr());
    }
}
