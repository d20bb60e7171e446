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

    /// Takes ownership of bytes, without copying them when the vector is exactly full. (When it
    /// has spare capacity, turning it into a box would reallocate and free the old buffer
    /// unwiped: the bytes are copied instead, and the whole old buffer is zeroized.)
    pub fn from_vec(mut bytes: Vec<u8>) -> Self {
        if bytes.capacity() == bytes.len() {
            return Self {
                bytes: bytes.into_boxed_slice(),
            };
        }
        let out = Self::from_slice(&bytes);
        bytes.zeroize();
        out
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

    /// Hands the bytes to a [`bytes::Bytes`] (a response field) without copying them. They are
    /// zeroized when the last reference to that `Bytes` is dropped, i.e. once the response has
    /// been encoded; the encoder's own copy (tonic's send buffer) is not ours to wipe.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
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

    /// The response field points at the key's own (zeroize-on-drop) buffer: no unwiped copy is
    /// made on the way into the response. (The wipe itself happens when freed memory can no
    /// longer be read safely, so it is not observed here.)
    #[test]
    fn into_bytes_shares_the_buffer_without_a_copy() {
        let key = SecretKey::from_slice(&[0xa5; 32]);
        let ptr = key.as_ref().as_ptr();
        let bytes = key.into_bytes();
        assert_eq!(bytes.as_ptr(), ptr, "no copy");
        assert_eq!(&bytes[..], &[0xa5; 32]);
        let clone = bytes.clone();
        drop(bytes);
        assert_eq!(clone.as_ptr(), ptr);
        assert_eq!(&clone[..], &[0xa5; 32]);
    }

    #[test]
    fn from_vec_with_spare_capacity_copies_exactly() {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&[7u8; 16]);
        let k = SecretKey::from_vec(v);
        assert_eq!(k.as_ref(), &[7u8; 16]);
        let exact = vec![9u8; 16];
        let ptr = exact.as_ptr();
        let k = SecretKey::from_vec(exact);
        assert_eq!(
            k.as_ref().as_ptr(),
            ptr,
            "an exactly full vector is taken as is"
        );
    }

    #[test]
    fn duplicate_is_equal_but_separate() {
        let a = SecretKey::generate(32).unwrap();
        let b = a.duplicate();
        assert_eq!(a.as_ref(), b.as_ref());
        assert_ne!(a.as_ref().as_ptr(), b.as_ref().as_ptr());
    }
}
