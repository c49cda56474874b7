//! The CUDA kernels (CUDA C in the `.cu` files here, compiled at run time
//! with NVRTC by the CUDA backend) and their CPU twins, which define what
//! each kernel must compute, bf16 rounding included. `make test` compiles
//! every `.cu` file with NVRTC for sm_90 (`nvrtc_check.py`), so a kernel
//! that does not compile fails CI even without a GPU; GPU parity tests
//! compare each kernel with its twin.

pub mod adamw;
pub mod lora;

/// Every kernel source by file name, as the CUDA backend loads them.
pub const SOURCES: &[(&str, &str)] = &[("lora.cu", include_str!("lora.cu")), ("adamw.cu", include_str!("adamw.cu"))];

/// Rounds to the nearest bfloat16 (ties to even), as `__float2bfloat16_rn`.
pub fn bf16_round(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1));
    f32::from_bits(rounded & 0xFFFF_0000)
}

/// bf16 bit patterns of `values` (rounded), as the device stores them.
pub fn bf16_bits(values: &[f32]) -> Vec<u16> {
    values.iter().map(|x| (bf16_round(*x).to_bits() >> 16) as u16).collect()
}

/// The values of bf16 bit patterns.
pub fn from_bf16_bits(bits: &[u16]) -> Vec<f32> {
    bits.iter().map(|b| f32::from_bits(u32::from(*b) << 16)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_keeps_eight_bits_of_mantissa_and_ties_to_even() {
        assert_eq!(bf16_round(1.0), 1.0);
        assert_eq!(bf16_round(1.0 + 1.0 / 256.0), 1.0, "a tie rounds to the even neighbour");
        assert_eq!(bf16_round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0, "a tie rounds up to even");
        assert_eq!(bf16_round(1.0 + 1.5 / 256.0), 1.0 + 2.0 / 256.0);
        let values = [1.0f32, -2.5, 0.0078125, -0.0, 65536.0];
        assert_eq!(from_bf16_bits(&bf16_bits(&values)), values, "bf16-exact values survive the bits");
        assert_eq!(bf16_bits(&[1.0, -2.0]), [0x3F80, 0xC000]);
        for x in [0.1f32, -7.3, 1234.5, 3.0e-5] {
            let r = bf16_round(x);
            assert_eq!(r.to_bits() & 0xFFFF, 0, "{x} -> {r}");
            assert!(((r - x) / x).abs() <= 1.0 / 256.0, "{x} -> {r}");
        }
        // Every .cu file is listed.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/kernels");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".cu"))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = SOURCES.iter().map(|(n, _)| n.to_string()).collect();
        listed.sort();
        assert_eq!(on_disk, listed);
    }
}
