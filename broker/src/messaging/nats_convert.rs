//! Conversions between holdfast's wire types and async-nats types.

use crate::journal::MESSAGE_ID_HEADER;
use async_nats::header::{HeaderName, HeaderValue};
use async_nats::{HeaderMap, Subject};
use holdfast_wire::{chain, Headers, Text};

/// Why wire headers cannot be handed to async-nats (whose own conversion
/// of a value with CR or LF panics rather than fail).
#[derive(Debug, thiserror::Error)]
pub enum InvalidHeader {
    #[error(
        "header {name:?} is not a valid NATS header name (printable ASCII, no ':', not empty)"
    )]
    Name { name: String },
    #[error("the value of header {name:?} holds a CR or LF, which NATS headers cannot carry")]
    Value { name: String },
}

/// The subject without copying: both types are UTF-8 over `Bytes`.
pub fn to_subject(text: &Text) -> Subject {
    Subject::from_utf8(text.as_bytes().clone()).unwrap_or_else(|_| Subject::from(text.as_str()))
}

/// Checks that `headers` can go to NATS, without building a map: the rules
/// async-nats applies (a test keeps the two in step). A request served by a
/// local subscriber is checked too, so a NATS-protocol subscriber on this
/// relay never gets a header line it would misread.
pub fn check_headers(headers: &Headers) -> Result<(), InvalidHeader> {
    for (name, value) in headers.iter() {
        if name.is_empty()
            || name
                .bytes()
                .any(|byte| !byte.is_ascii_graphic() || byte == b':')
        {
            return Err(InvalidHeader::Name {
                name: name.to_string(),
            });
        }
        if value.bytes().any(|byte| byte == b'\r' || byte == b'\n') {
            return Err(InvalidHeader::Value {
                name: name.to_string(),
            });
        }
    }
    Ok(())
}

/// Wire headers as an async-nats map; `None` when there are none, so a
/// header-less publish stays a plain PUB upstream.
pub fn to_header_map(headers: &Headers) -> Result<Option<HeaderMap>, InvalidHeader> {
    if headers.is_empty() {
        return Ok(None);
    }
    let distinct = names_distinct(headers);
    let mut map = HeaderMap::new();
    for (name, value) in headers.iter() {
        let header_name = match relay_header_name(name.as_str()) {
            Some(known) => known,
            None if name.is_empty() => {
                return Err(InvalidHeader::Name {
                    name: String::new(),
                })
            }
            None => name.as_str().parse().map_err(|_| InvalidHeader::Name {
                name: name.to_string(),
            })?,
        };
        let header_value: HeaderValue =
            value.as_str().parse().map_err(|_| InvalidHeader::Value {
                name: name.to_string(),
            })?;
        if distinct {
            map.insert(header_name, header_value);
        } else {
            map.append(header_name, header_value);
        }
    }
    Ok(Some(map))
}

/// Whether no two header names are alike, in any letter case (the map's
/// own comparison is no looser). Then each can be inserted with one hash
/// instead of append's look-up and insert: this runs for every replayed
/// message, which carries four stamped headers. Long lists are not checked
/// (pairwise comparison) and take the append path.
fn names_distinct(headers: &Headers) -> bool {
    const CHECKED: usize = 16;
    let list = &headers.0;
    list.len() <= CHECKED
        && list.iter().enumerate().all(|(index, (name, _))| {
            list[index + 1..]
                .iter()
                .all(|(other, _)| !name.as_str().eq_ignore_ascii_case(other.as_str()))
        })
}

/// The names the relay stamps on every journaled message, without the
/// parse and copy a name from the wire costs (this runs per replayed message).
fn relay_header_name(name: &str) -> Option<HeaderName> {
    const RELAY: HeaderName = HeaderName::from_static(chain::HEADER_RELAY);
    const SEQ: HeaderName = HeaderName::from_static(chain::HEADER_SEQ);
    const CHAIN: HeaderName = HeaderName::from_static(chain::HEADER_CHAIN);
    const MESSAGE_ID: HeaderName = HeaderName::from_static(MESSAGE_ID_HEADER);
    match name {
        chain::HEADER_RELAY => Some(RELAY),
        chain::HEADER_SEQ => Some(SEQ),
        chain::HEADER_CHAIN => Some(CHAIN),
        MESSAGE_ID_HEADER => Some(MESSAGE_ID),
        _ => None,
    }
}

pub fn from_header_map(map: Option<&HeaderMap>) -> Headers {
    let mut headers = Headers::new();
    if let Some(map) = map {
        for (name, values) in map.iter() {
            for value in values {
                headers.insert(Text::from(name.as_ref()), Text::from(value.as_str()));
            }
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_with_repeated_names() {
        let mut headers = Headers::new();
        headers.insert("Trace-Id", "abc");
        headers.insert("Tag", "one");
        headers.insert("Tag", "two");
        // The names the relay stamps take a shortcut; they must read the same.
        headers.insert(chain::HEADER_RELAY, "relay-1");
        headers.insert(chain::HEADER_SEQ, "7");
        headers.insert(chain::HEADER_CHAIN, "00000000000000ff");
        headers.insert("Nats-Msg-Id", "relay-1.kv_events.7");
        let map = to_header_map(&headers).unwrap().unwrap();
        let mut back = from_header_map(Some(&map)).0;
        back.sort();
        let mut expected = headers.0.clone();
        expected.sort();
        assert_eq!(back, expected);
    }

    #[test]
    fn names_alike_in_letter_case_keep_every_value() {
        let mut headers = Headers::new();
        headers.insert("Tag", "one");
        headers.insert("tag", "two");
        headers.insert("TAG", "three");
        let map = to_header_map(&headers).unwrap().unwrap();
        let values: usize = map.iter().map(|(_, values)| values.len()).sum();
        assert_eq!(values, 3);
    }

    #[test]
    fn empty_headers_stay_absent_and_bad_names_are_rejected() {
        assert!(to_header_map(&Headers::new()).unwrap().is_none());
        for bad in ["bad name", "colon:", "", "tab\there"] {
            let mut headers = Headers::new();
            headers.insert(bad, "x");
            assert!(
                matches!(to_header_map(&headers), Err(InvalidHeader::Name { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_check_agrees_with_the_conversion() {
        let names = [
            "Trace-Id", "", "a b", "a:b", "tab\t", "ünï", "~!#$%", "X\u{7f}",
        ];
        let values = ["", "plain", "a\nb", "a\rb", " spaced : out ", "ünïcödé"];
        for name in names {
            for value in values {
                let mut headers = Headers::new();
                headers.insert(name, value);
                let checked = check_headers(&headers).map_err(|error| error.to_string());
                let converted = to_header_map(&headers)
                    .map(|_| ())
                    .map_err(|error| error.to_string());
                assert_eq!(checked, converted, "{name:?}: {value:?}");
            }
        }
    }

    #[test]
    fn values_with_line_breaks_are_an_error_not_a_panic() {
        for bad in ["a\nb", "a\rb", "a\r\nInjected: yes", "\n"] {
            let mut headers = Headers::new();
            headers.insert("Fine", "ok");
            headers.insert("Trace-Id", bad);
            let error = to_header_map(&headers).unwrap_err();
            assert!(
                matches!(&error, InvalidHeader::Value { name } if name == "Trace-Id"),
                "{bad:?}: {error}"
            );
        }
        // Everything else a value may hold goes through unchanged.
        let mut headers = Headers::new();
        headers.insert("Odd", " spaces, colons: and ünïcödé\t");
        let map = to_header_map(&headers).unwrap().unwrap();
        assert_eq!(from_header_map(Some(&map)).0, headers.0);
    }
}
