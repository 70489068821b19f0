//! scratch, to be deleted
use caregate_fhir::outcome::IssueSink;
use caregate_fhir::resource::ResourceType;
use caregate_fhir::schema::SchemaRegistry;
use serde_json::{json, Value};

#[test]
fn scratch() {
    let t0 = std::time::Instant::now();
    let reg = SchemaRegistry::builtin().unwrap();
    eprintln!("builtin() took {:?}", t0.elapsed());
    for f in ["uk-core/examples/UKCore-Patient-RichardSmith-Example.json", "uk-core/examples/UKCore-Observation-VitalSigns-BloodPressure-Example.json", "uk-core/examples/UKCore-MedicationRequest-Amoxicillin-Example.json", "fhir-r4/examples/patient-example.json"] {
        let text = std::fs::read_to_string(format!("/work/shared/corpora/{f}")).unwrap();
        let v: Value = serde_json::from_str(text.trim_start_matches('\u{feff}')).unwrap();
        let compact = serde_json::to_string(&v).unwrap().len();
        let rt: ResourceType = v["resourceType"].as_str().unwrap().parse().unwrap();
        let n = 20000;
        let t = std::time::Instant::now();
        for _ in 0..n { let mut s = IssueSink::default(); reg.validate(rt, &v, &mut s); assert!(s.is_empty()); }
        eprintln!("{f}: {compact} bytes, {:?} per validation", t.elapsed() / n);
    }
    let patient = json!({
        "resourceType": "Patient", "id": "9434765919/x", "gender": "9434765919", "birthDate": "9434765919",
        "active": "9434765919", "identifier": [{"value": 9434765919u64, "use": "9434765919"}],
        "name": [{"family": ["Smith"], "use": "Smith"}], "telecom": [{"rank": 0}], "9434765919": "misplaced",
        "deceasedBoolean": false, "deceasedDateTime": "9434765919", "_given": {}, "multipleBirthInteger": 1.5,
        "contained": [{"resourceType": 3}], "text": {"status": "generated", "div": "plain"}
    });
    let mut s = IssueSink::default();
    reg.validate(ResourceType::Patient, &patient, &mut s);
    for i in s.finish() { eprintln!("{:?} {:?} {}", i.code, i.expression, i.diagnostics); }
}
