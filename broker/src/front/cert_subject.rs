//! Reading the subject common name out of an X.509 certificate (DER).
//!
//! Only what identifying a QUIC peer needs: walk to the subject Name and
//! return its CN. The certificate has already been verified by rustls
//! against the client CA, so this trusts the structure but still never
//! panics or reads out of bounds on malformed input; it returns `None`.

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const VERSION_TAG: u8 = 0xa0;
/// OID 2.5.4.3, id-at-commonName.
const COMMON_NAME_OID: &[u8] = &[0x55, 0x04, 0x03];
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const TELETEX_STRING: u8 = 0x14;
const IA5_STRING: u8 = 0x16;

/// One DER element: its tag, its contents, and what follows it.
struct Element<'a> {
    tag: u8,
    contents: &'a [u8],
    rest: &'a [u8],
}

fn element(input: &[u8]) -> Option<Element<'_>> {
    let (&tag, after_tag) = input.split_first()?;
    let (&first_length_byte, after_length_byte) = after_tag.split_first()?;
    let (length, after_length) = if first_length_byte < 0x80 {
        (usize::from(first_length_byte), after_length_byte)
    } else {
        let count = usize::from(first_length_byte & 0x7f);
        if count == 0 || count > 4 || after_length_byte.len() < count {
            return None;
        }
        let (length_bytes, after) = after_length_byte.split_at(count);
        let length = length_bytes
            .iter()
            .fold(0usize, |length, &byte| (length << 8) | usize::from(byte));
        (length, after)
    };
    if after_length.len() < length {
        return None;
    }
    let (contents, rest) = after_length.split_at(length);
    Some(Element {
        tag,
        contents,
        rest,
    })
}

/// The subject common name of the DER certificate `der`, if it has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    let certificate = element(der).filter(|element| element.tag == SEQUENCE)?;
    let tbs = element(certificate.contents).filter(|element| element.tag == SEQUENCE)?;
    let mut fields = tbs.contents;
    let first = element(fields)?;
    if first.tag == VERSION_TAG {
        fields = first.rest;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        fields = element(fields)?.rest;
    }
    let subject = element(fields).filter(|element| element.tag == SEQUENCE)?;
    let mut names = subject.contents;
    while !names.is_empty() {
        let relative_name = element(names).filter(|element| element.tag == SET)?;
        names = relative_name.rest;
        let mut attributes = relative_name.contents;
        while !attributes.is_empty() {
            let attribute = element(attributes).filter(|element| element.tag == SEQUENCE)?;
            attributes = attribute.rest;
            let kind = element(attribute.contents).filter(|element| element.tag == OID)?;
            if kind.contents != COMMON_NAME_OID {
                continue;
            }
            let value = element(kind.rest)?;
            return match value.tag {
                UTF8_STRING | PRINTABLE_STRING | TELETEX_STRING | IA5_STRING => {
                    std::str::from_utf8(value.contents).ok().map(str::to_string)
                }
                _ => None,
            };
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

    fn certificate(subject: &[(DnType, &str)]) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let mut name = DistinguishedName::new();
        for (kind, value) in subject {
            name.push(kind.clone(), *value);
        }
        params.distinguished_name = name;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn finds_the_common_name_among_other_attributes() {
        let der = certificate(&[
            (DnType::OrganizationName, "holdfast"),
            (DnType::CommonName, "prefill-worker-7"),
            (DnType::CountryName, "NL"),
        ]);
        assert_eq!(common_name(&der).as_deref(), Some("prefill-worker-7"));
    }

    #[test]
    fn a_subject_without_common_name_has_none() {
        let der = certificate(&[(DnType::OrganizationName, "holdfast")]);
        assert_eq!(common_name(&der), None);
    }

    #[test]
    fn truncated_or_garbage_input_gives_none_without_panicking() {
        let der = certificate(&[(DnType::CommonName, "x")]);
        for length in 0..der.len() {
            let _ = common_name(&der[..length]);
        }
        assert_eq!(common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(common_name(b"not a certificate"), None);
    }
}
