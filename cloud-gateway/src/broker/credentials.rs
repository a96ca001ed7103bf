//! Device broker passwords as the registry keeps them: `sha256$SALT$DIGEST`, never the
//! password. The passwords are 24 random bytes the gateway issues, far beyond guessing, so a
//! salted SHA-256 suffices; a slow hash only helps passwords people choose.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh password: 24 random bytes, hex.
pub fn new_password() -> Result<String> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| Error::Random(e.to_string()))?;
    Ok(hex(&bytes))
}

fn digest(salt: &str, password: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update(password);
    hex(&h.finalize())
}

/// What the registry keeps for `password`.
pub fn hash(password: &str) -> Result<String> {
    let salt = &new_password()?[..32];
    Ok(format!("sha256${salt}${}", digest(salt, password.as_bytes())))
}

/// Whether `password` is the one `secret` was made from. Compares in constant time.
pub fn verify(secret: &str, password: &[u8]) -> bool {
    let mut parts = secret.split('$');
    let (Some("sha256"), Some(salt), Some(expected), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let got = digest(salt, password);
    got.len() == expected.len() && got.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_verifies_against_its_hash_only() {
        let password = new_password().expect("password");
        let secret = hash(&password).expect("hash");
        assert!(!secret.contains(&password));
        assert!(verify(&secret, password.as_bytes()));
        assert!(!verify(&secret, b"guess"));
        assert!(!verify(&hash("other").expect("hash"), password.as_bytes()));
        assert_ne!(hash(&password).expect("hash"), secret, "salted");
        for broken in ["", "sha256$", "md5$aa$bb", &format!("{secret}$x")] {
            assert!(!verify(broken, password.as_bytes()), "{broken}");
        }
    }
}
