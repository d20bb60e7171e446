//! EncryptStream and DecryptStream, the key side: the checks of a unary request, made once per
//! stream, then a sealer or opener for the stream envelope (`envelope::stream`) that the front
//! door feeds chunk by chunk. Nothing here holds more than the header; the segments pass
//! through the sealer and opener one at a time.
//!
//! A stream counts as one message against its data key's limits (`max_messages`); its length
//! is not known when the data key is chosen, so it is not counted against `max_bytes`
//! (docs/caching.md): each stream has its own message key all the same.
//!
//! Must never: hand out an opener before the policy, the key's state and the header's key
//! commitment allowed it.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Broker, check_context, check_key_field, note_active, seal_error, take};
use crate::cache::Purpose;
use crate::envelope::stream::{self, StreamOpener, StreamSealer};
use crate::error::Error;
use crate::facts::Facts;
use crate::operation::Operation;
use crate::policy::Need;
use crate::principal::Caller;

/// A stream being encrypted: its header (the first bytes of the envelope) and its sealer.
pub struct StreamEncrypt {
    pub header: Vec<u8>,
    pub sealer: StreamSealer,
    pub key: Arc<str>,
    pub key_version: String,
}

/// A stream being decrypted: its opener, and the key that opened the header.
pub struct StreamDecrypt {
    pub opener: StreamOpener,
    pub key: Arc<str>,
    pub key_version: String,
}

impl Broker {
    /// Starts an EncryptStream: input limits, key, permission, state, then a data key from the
    /// cache (or backend), as [`Broker::encrypt`] does.
    pub async fn encrypt_stream(
        &self,
        caller: &Caller,
        key: &str,
        context: &BTreeMap<String, String>,
        facts: &mut Facts,
    ) -> Result<StreamEncrypt, Error> {
        check_context(context, "context")?;
        check_key_field(key, "key")?;
        let registry = self.registry.load();
        let entry = self.usable_key(&registry, caller, key, Need::Op(Operation::Encrypt), facts)?;
        let lookup = self
            .cache
            .active_key(entry.cached(), &caller.name, Purpose::Messages, 0)
            .await;
        let (active, result) = take(lookup, entry, facts)?;
        note_active(facts, &active, result);
        let (header, sealer) = stream::seal_stream(
            &entry.name,
            &caller.name,
            &active.copies(),
            active.data_key(),
            context,
        )
        .map_err(seal_error)?;
        Ok(StreamEncrypt {
            header,
            sealer,
            key: Arc::clone(&entry.name),
            key_version: active.wrapped.key_version.clone(),
        })
    }

    /// Starts a DecryptStream from the stream's header (`header` holds at least the whole
    /// header, see [`stream::parse_header`]): key, permission, state, the data key through any
    /// of the header's copies, then the key commitment.
    pub async fn decrypt_stream(
        &self,
        caller: &Caller,
        header: &stream::StreamHeader<'_>,
        context: &BTreeMap<String, String>,
        facts: &mut Facts,
    ) -> Result<StreamDecrypt, Error> {
        check_context(context, "context")?;
        let registry = self.registry.load();
        let entry = self.usable_key(
            &registry,
            caller,
            header.key_name,
            Need::Op(Operation::Decrypt),
            facts,
        )?;
        let (copy, _, data_key) = self
            .unwrap_copies(
                entry,
                header.key_name,
                header.caller,
                &header.copies,
                Operation::Decrypt,
                facts,
            )
            .await?;
        let opener = header
            .opener(data_key.data_key(), context)
            .map_err(|_| Error::DecryptionFailed)?;
        Ok(StreamDecrypt {
            opener,
            key: Arc::clone(&entry.name),
            key_version: copy.key_version.to_owned(),
        })
    }
}
