#![no_main]

use peerchat_testkit::checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::file_name(data));
