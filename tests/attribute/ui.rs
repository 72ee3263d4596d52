//! trybuild UI tests: every compile-time rule of CONTRACT §2 has a failing case
//! whose `.stderr` points at the offending token, and the pass cases cover the
//! signatures and hygiene the attribute must keep working.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/attribute/ui/pass/*.rs");
    t.compile_fail("tests/attribute/ui/fail/*.rs");
}
