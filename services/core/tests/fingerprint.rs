//! Single-object fingerprints follow the Avro specification (CRC-64-AVRO of
//! the Parsing Canonical Form), so other Avro libraries recognise our records;
//! records written with the fingerprint of earlier releases (apache-avro's
//! canonical form) stay readable.

use apache_avro::Schema;
use flywheel_core::codec::{
    Codec, HEADER_LEN, MAGIC, RecordKind, crc64_avro, encode, fingerprint_of_text, header_of, legacy_fingerprint,
    parsing_canonical_form, released_schemas,
};
use flywheel_core::records::Interaction;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn fixture(name: &str) -> Interaction {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/fixtures").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Canonical forms and fingerprints computed by fastavro 1.13.1
/// (`to_parsing_canonical_form(parse_schema(s))`, `fingerprint(.., "CRC-64-AVRO")`),
/// so this test checks us against another implementation without needing Python.
#[test]
fn canonical_forms_and_fingerprints_match_fastavro() {
    let cases = [
        (r#""null""#, r#""null""#, "8a8f25cce724dd63"),
        (r#""long""#, r#""long""#, "b71df49344e154d0"),
        (r#"{"type":"long","logicalType":"timestamp-millis"}"#, r#""long""#, "b71df49344e154d0"),
        (
            r#"{"type":"record","name":"R","namespace":"a.b","doc":"d","fields":[
                {"name":"t","type":{"type":"long","logicalType":"timestamp-millis"},"default":0},
                {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"],"default":"X"}},
                {"name":"e2","type":["null","E"]},
                {"name":"f","type":{"type":"fixed","name":"c.F","size":16}},
                {"name":"m","type":{"type":"map","values":{"type":"array","items":"a.b.E"}}},
                {"name":"n","type":{"type":"record","name":"Inner","fields":[
                    {"name":"u","type":{"type":"string","logicalType":"uuid"}}]}}]}"#,
            concat!(
                r#"{"name":"a.b.R","type":"record","fields":[{"name":"t","type":"long"},"#,
                r#"{"name":"e","type":{"name":"a.b.E","type":"enum","symbols":["X","Y"]}},"#,
                r#"{"name":"e2","type":["null","a.b.E"]},{"name":"f","type":{"name":"c.F","type":"fixed","size":16}},"#,
                r#"{"name":"m","type":{"type":"map","values":{"type":"array","items":"a.b.E"}}},"#,
                r#"{"name":"n","type":{"name":"a.b.Inner","type":"record","fields":[{"name":"u","type":"string"}]}}]}"#
            ),
            "79896357b6635dc8",
        ),
    ];
    // An error type is a record to the canonical form.
    assert_eq!(
        parsing_canonical_form(r#"{"type":"error","name":"E","fields":[{"name":"m","type":"string"}]}"#).unwrap(),
        r#"{"name":"E","type":"record","fields":[{"name":"m","type":"string"}]}"#
    );
    for (schema, canonical, fingerprint) in cases {
        assert_eq!(parsing_canonical_form(schema).unwrap(), canonical, "{schema}");
        assert_eq!(hex(&fingerprint_of_text(schema).unwrap()), fingerprint, "{schema}");
    }
    // The specification's reference value: fingerprint64("null") = 0x63dd24e7cc258f8a, little-endian on the wire.
    assert_eq!(u64::from_le_bytes(crc64_avro(br#""null""#)), 0x63dd_24e7_cc25_8f8a);
}

#[test]
fn interaction_records_carry_the_specifications_fingerprint() {
    let schema = RecordKind::Interaction.current_schema();
    let canonical = parsing_canonical_form(schema).unwrap();
    // Logical types are stripped to their primitive, as the specification says.
    assert!(canonical.contains(r#"{"name":"event_time","type":"long"}"#), "{canonical}");
    for stripped in ["logicalType", "doc", "default", " ", "namespace"] {
        assert!(!canonical.contains(stripped), "{stripped} in {canonical}");
    }
    assert!(canonical.starts_with(r#"{"name":"flywheel.Interaction","type":"record","fields":["#), "{canonical}");

    let spec = "4f69ffe6d604f67a"; // fastavro and the Java library agree
    assert_eq!(hex(&Codec::global().fingerprint(RecordKind::Interaction)), spec);
    let bytes = encode(&fixture("interaction.shown.json")).unwrap();
    assert_eq!((&bytes[..2], hex(&bytes[2..HEADER_LEN]).as_str()), (&MAGIC[..], spec));
    // What releases before the fix wrote.
    let parsed = Schema::parse_str(schema).unwrap();
    assert_eq!(hex(&legacy_fingerprint(&parsed)), "6631d59731f74f7d");
}

#[test]
fn both_ways_of_computing_the_fingerprint_agree_for_every_released_schema() {
    for kind in RecordKind::ALL {
        for text in kind.history().iter().chain([&kind.current_schema()]) {
            let parsed = Schema::parse_str(text).unwrap();
            let header = header_of(&parsed);
            assert_eq!(&header[..2], &MAGIC);
            assert_eq!(header[2..], fingerprint_of_text(text).unwrap(), "{kind}: parsed schema vs its text");
        }
    }
}

#[test]
fn records_written_with_the_legacy_fingerprint_stay_readable() {
    let codec = Codec::global();
    let record = fixture("interaction.rated.json");
    let current = encode(&record).unwrap();
    let parsed = Schema::parse_str(RecordKind::Interaction.current_schema()).unwrap();
    let mut legacy = current.clone();
    legacy[2..HEADER_LEN].copy_from_slice(&legacy_fingerprint(&parsed));
    assert_ne!(legacy, current);
    assert_eq!(codec.decode::<Interaction>(&legacy).unwrap(), record);
    // Same writer schema, same version, whichever fingerprint names it.
    assert_eq!(codec.identify(&legacy).unwrap(), codec.identify(&current).unwrap());
    assert_eq!(codec.decode_to_json(&legacy).unwrap(), codec.decode_to_json(&current).unwrap());
    // Either header names the schema by its specification fingerprint.
    let spec = codec.fingerprint(RecordKind::Interaction);
    assert_eq!((codec.spec_fingerprint(&legacy).unwrap(), codec.spec_fingerprint(&current).unwrap()), (spec, spec));
    assert_eq!(codec.spec_fingerprint(&current[..4]).unwrap_err().reason_code(), "truncated");
}

#[test]
fn released_schemas_list_both_fingerprints_of_every_version() {
    for kind in RecordKind::ALL {
        let released = released_schemas(kind).unwrap();
        for text in kind.history() {
            let parsed = Schema::parse_str(text).unwrap();
            for fingerprint in [fingerprint_of_text(text).unwrap(), legacy_fingerprint(&parsed)] {
                let found: Vec<&str> = released.iter().filter(|(f, _)| *f == fingerprint).map(|(_, t)| *t).collect();
                assert_eq!(
                    found,
                    vec![*text],
                    "{kind}: fingerprint {} listed once, with its schema",
                    hex(&fingerprint)
                );
            }
        }
        // The fingerprint the codec writes is among them.
        assert!(released.iter().any(|(f, _)| *f == Codec::global().fingerprint(kind)), "{kind}");
    }
}
