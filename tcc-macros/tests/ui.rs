//! The attribute's compile-time behaviour: definitions that must compile (`ui/pass`) and every
//! mistake it reports, each with its error snapshot (`ui/fail/*.stderr`). Regenerate snapshots with
//! `TRYBUILD=overwrite cargo test -p tcc-macros --test ui`, then read each one.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
