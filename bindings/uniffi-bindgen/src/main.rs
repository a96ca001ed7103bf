//! `uniffi-bindgen`: generates foreign-language bindings from the built driftless-ffi library.
//! Kept in its own crate so building the library does not pay for the generator.

fn main() {
    uniffi::uniffi_bindgen_main()
}
