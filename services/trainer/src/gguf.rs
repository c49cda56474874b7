//! GGUF, llama.cpp's single-file model format: the v2/v3 header, typed
//! metadata, the tensor directory, and dequantisation of the block formats
//! most published files use (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K,
//! Q6_K) to f32.
//!
//! Layout (little-endian): magic `GGUF`, version `u32`, tensor count `u64`,
//! metadata count `u64`; then each metadata entry (key string, value type
//! `u32`, value); then each tensor's name, dimension count `u32`, dimensions
//! `u64` (`ne[]`, innermost first), ggml type `u32` and data offset `u64`;
//! then padding to `general.alignment` (default 32) and the tensor data, each
//! tensor at its offset from the start of that data. Strings are a `u64`
//! byte length and UTF-8 bytes; arrays an element type `u32`, a count `u64`
//! and the elements.
//!
//! Files are memory-mapped: a tensor is dequantised straight from the
//! mapping, the file is never copied whole.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::TrainerError;

/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Deepest nesting of arrays accepted in metadata (real files use one level).
const MAX_ARRAY_DEPTH: usize = 4;

/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// A metadata value, with the width the file gave it (so a `u32` key stays
/// distinguishable from an `i32` one when a reader cares).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8.
    String(String),
    /// Type 9: elements of one type.
    Array(Vec<Value>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl Value {
    /// Any integer that fits `u64` (files disagree on the width of counts).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(u64::from(v)),
            Value::U16(v) => Some(u64::from(v)),
            Value::U32(v) => Some(u64::from(v)),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer as `i64` (token types are `i32` in some files, `u32` in others).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(i64::from(v)),
            Value::I16(v) => Some(i64::from(v)),
            Value::I32(v) => Some(i64::from(v)),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A float, or an integer read as one.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(f64::from(v)),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// A string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// An array's elements.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::F32(_) => "float32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F64(_) => "float64",
        }
    }
}

/// A ggml tensor type by its numeric id; ids this reader does not know stay
/// representable so the refusal can quote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// IEEE single.
    pub const F32: GgmlType = GgmlType(0);
    /// IEEE half.
    pub const F16: GgmlType = GgmlType(1);
    /// 32 weights: f16 scale, 4-bit values offset by 8.
    pub const Q4_0: GgmlType = GgmlType(2);
    /// 32 weights: f16 scale and minimum, 4-bit values.
    pub const Q4_1: GgmlType = GgmlType(3);
    /// 32 weights: f16 scale, signed 8-bit values.
    pub const Q8_0: GgmlType = GgmlType(8);
    /// 256 weights: eight 32-weight groups with 6-bit scales and minima, 4-bit values.
    pub const Q4_K: GgmlType = GgmlType(12);
    /// As Q4_K with a fifth bit per value.
    pub const Q5_K: GgmlType = GgmlType(13);
    /// 256 weights: sixteen 16-weight groups with 8-bit scales, 6-bit values offset by 32.
    pub const Q6_K: GgmlType = GgmlType(14);
    /// bfloat16.
    pub const BF16: GgmlType = GgmlType(30);

    /// Every type this module dequantises.
    pub const SUPPORTED: [GgmlType; 9] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// ggml's name of the type (`Q4_K`), or `type N` for an id unknown here.
    pub fn name(self) -> String {
        let known = match self.0 {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            4 => "Q4_2",
            5 => "Q4_3",
            6 => "Q5_0",
            7 => "Q5_1",
            8 => "Q8_0",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            30 => "BF16",
            34 => "TQ1_0",
            35 => "TQ2_0",
            39 => "MXFP4",
            n => return format!("type {n}"),
        };
        known.to_string()
    }

    /// `(weights per block, bytes per block)` of the supported types; the
    /// size of any other type is not needed, since it is refused.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        Some(match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q8_0 => (32, 2 + 32),
            GgmlType::Q4_0 => (32, 2 + 16),
            GgmlType::Q4_1 => (32, 2 + 2 + 16),
            GgmlType::Q4_K => (256, 2 + 2 + 12 + 128),
            GgmlType::Q5_K => (256, 2 + 2 + 12 + 32 + 128),
            GgmlType::Q6_K => (256, 128 + 64 + 16 + 2),
            _ => return None,
        })
    }

    fn supported_names() -> String {
        GgmlType::SUPPORTED.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// llama.cpp's tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// `ne[]`: dimensions innermost first (the reverse of a row-major shape).
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The row-major shape (`ne[]` reversed): `[out, in]` for a matrix.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of weights.
    pub fn elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    /// Bytes the tensor occupies, where its type's layout is known.
    pub fn byte_len(&self) -> Option<usize> {
        let (block, size) = self.ggml_type.block_layout()?;
        Some(self.elements() / block * size)
    }
}

/// Everything before the tensor data.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// 2 or 3 (3 only adds big-endian files, which are refused).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, Value>,
    /// The tensor directory, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of the data section and of each tensor in it.
    pub alignment: u64,
    /// Byte offset of the data section in the file.
    pub data_offset: usize,
}

impl Header {
    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A tensor's directory entry by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

fn format_err(detail: impl std::fmt::Display) -> TrainerError {
    TrainerError::Format(format!("GGUF: {detail}"))
}

/// Reads little-endian fields off a byte slice, refusing to run past its end.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], TrainerError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            format_err(format!(
                "file truncated: {what} needs {n} bytes at offset {}, the file has {}",
                self.pos,
                self.bytes.len()
            ))
        })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], TrainerError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, TrainerError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, TrainerError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn string(&mut self, what: &str) -> Result<String, TrainerError> {
        let len = self.u64(what)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.remaining())
            .ok_or_else(|| format_err(format!("{what}: string length {len} exceeds the file")))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format_err(format!("{what}: string is not UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value, TrainerError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array(key)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format_err(format!("{key}: bool byte {b} is neither 0 nor 1"))),
            },
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(TrainerError::Unsupported(format!(
                        "GGUF metadata {key}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let elem = self.u32(key)?;
                let count = self.u64(key)?;
                // Every element takes at least one byte: a count beyond the
                // file is corrupt, and must not reserve memory.
                let count = usize::try_from(count)
                    .ok()
                    .filter(|&c| c <= self.remaining())
                    .ok_or_else(|| format_err(format!("{key}: array of {count} elements exceeds the file")))?;
                let mut items = Vec::with_capacity(count.min(1 << 16));
                for _ in 0..count {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(TrainerError::Unsupported(format!(
                    "GGUF metadata value type {other} (key {key}; known types are 0-12)"
                )));
            }
        })
    }
}

/// Parses the header of a GGUF file held in `bytes` (the whole file: tensor
/// extents are checked against its length).
pub fn parse_header(bytes: &[u8]) -> Result<Header, TrainerError> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c.array::<4>("magic")?;
    if &magic != b"GGUF" {
        return Err(format_err(format!("not a GGUF file (starts with {magic:02x?}, expected \"GGUF\")")));
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(TrainerError::Unsupported(
                "GGUF version 1 (32-bit counts, from 2023; supported: versions 2 and 3)".into(),
            ));
        }
        v if matches!(v.swap_bytes(), 2 | 3) => {
            return Err(TrainerError::Unsupported(format!(
                "big-endian GGUF (version {}); only little-endian files are read",
                v.swap_bytes()
            )));
        }
        v => return Err(TrainerError::Unsupported(format!("GGUF version {v} (supported: versions 2 and 3)"))),
    }
    let tensor_count = c.u64("tensor count")?;
    let kv_count = c.u64("metadata count")?;
    // A metadata entry takes at least 13 bytes and a tensor entry at least
    // 32, so larger counts are corrupt (and must not reserve memory).
    let len = bytes.len() as u64;
    if kv_count.saturating_mul(13) > len || tensor_count.saturating_mul(32) > len {
        return Err(format_err(format!("{kv_count} metadata entries and {tensor_count} tensors exceed the file")));
    }
    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = c.string(&format!("metadata key {i}"))?;
        let ty = c.u32(&key)?;
        let value = c.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format_err(format!("metadata key {key} appears twice")));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| format_err(format!("general.alignment {v:?} is not a power of two")))?,
    };
    let mut tensors = Vec::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let name = c.string(&format!("tensor name {i}"))?;
        let n_dims = c.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format_err(format!("tensor {name} has {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})")));
        }
        let dims = (0..n_dims).map(|_| c.u64(&name)).collect::<Result<Vec<u64>, _>>()?;
        let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        if dims.contains(&0) || elements.is_none_or(|e| e > bytes.len() as u64 * 8) {
            return Err(format_err(format!("tensor {name} has impossible dimensions {dims:?}")));
        }
        let ggml_type = GgmlType(c.u32(&name)?);
        let offset = c.u64(&name)?;
        tensors.push(TensorInfo { name, dims, ggml_type, offset });
    }
    let data_offset = (c.pos as u64).next_multiple_of(alignment);
    let data_offset = usize::try_from(data_offset).map_err(|_| format_err("data section offset overflows"))?;
    let header = Header { version, metadata, tensors, alignment, data_offset };
    let mut names = std::collections::HashSet::new();
    for t in &header.tensors {
        if !names.insert(t.name.as_str()) {
            return Err(format_err(format!("tensor {} appears twice", t.name)));
        }
        if t.offset % alignment != 0 {
            return Err(format_err(format!(
                "tensor {} at offset {} is not {alignment}-byte aligned",
                t.name, t.offset
            )));
        }
        if let Some((block, _)) = t.ggml_type.block_layout()
            && t.dims[0] % block as u64 != 0
        {
            return Err(format_err(format!(
                "tensor {} rows of {} weights are not whole {} blocks of {block}",
                t.name, t.dims[0], t.ggml_type
            )));
        }
        if let Some(len) = t.byte_len() {
            let end = (data_offset as u64).checked_add(t.offset).and_then(|s| s.checked_add(len as u64));
            if end.is_none_or(|e| e > bytes.len() as u64) {
                return Err(format_err(format!(
                    "tensor {} ({} bytes at data offset {}) runs past the end of the file ({} bytes)",
                    t.name,
                    len,
                    t.offset,
                    bytes.len()
                )));
            }
        }
    }
    Ok(header)
}

/// An open, memory-mapped GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    header: Header,
}

impl GgufFile {
    /// Maps `path` and parses its header.
    pub fn open(path: &Path) -> Result<GgufFile, TrainerError> {
        let file = std::fs::File::open(path).map_err(|e| TrainerError::io(path, e))?;
        // Mapped, not read: a multi-gigabyte file is only paged in tensor by
        // tensor as it is dequantised.
        // SAFETY: model files are immutable inputs; a file truncated or
        // rewritten while mapped is outside what the importer supports.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| TrainerError::io(path, e))?;
        let header = parse_header(&map).map_err(|e| match e {
            TrainerError::Format(m) => TrainerError::Format(format!("{}: {m}", path.display())),
            TrainerError::Unsupported(m) => TrainerError::Unsupported(format!("{}: {m}", path.display())),
            other => other,
        })?;
        Ok(GgufFile { path: path.to_path_buf(), map, header })
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A tensor's raw bytes (bounds were checked when the header was parsed).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<&[u8], TrainerError> {
        let len = info.byte_len().ok_or_else(|| unsupported_type(info))?;
        let start = self.header.data_offset + info.offset as usize;
        Ok(&self.map[start..start + len])
    }

    /// A tensor's weights as f32, in row-major order of [`TensorInfo::shape`].
    pub fn dequantize(&self, info: &TensorInfo) -> Result<Vec<f32>, TrainerError> {
        dequantize(info.ggml_type, self.tensor_bytes(info)?, info.elements())
    }
}

fn unsupported_type(info: &TensorInfo) -> TrainerError {
    TrainerError::Unsupported(format!(
        "tensor {} is stored as ggml type {} (supported: {})",
        info.name,
        info.ggml_type,
        GgmlType::supported_names()
    ))
}

/// IEEE half → single precision, exactly (subnormals included).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from(h >> 10) & 0x1f;
    let mantissa = u32::from(h & 0x3ff);
    match exp {
        // Zero or subnormal: mantissa · 2⁻²⁴, exact in f32.
        0 => {
            let magnitude = mantissa as f32 * (1.0 / 16_777_216.0);
            if sign == 0 { magnitude } else { -magnitude }
        }
        0x1f => f32::from_bits(sign | 0x7f80_0000 | (mantissa << 13)),
        _ => f32::from_bits(sign | ((exp + 127 - 15) << 23) | (mantissa << 13)),
    }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// The 6-bit scale and minimum of group `j` (0..8) of a Q4_K/Q5_K block:
/// bytes 0-3 hold the low six bits of scales 0-3, bytes 4-7 those of minima
/// 0-3, and bytes 8-11 the low nibbles of scales/minima 4-7, whose top two
/// bits sit in the spare top bits of bytes 0-7.
fn k_scale_min(scales: &[u8], j: usize) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        ((scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
    };
    (f32::from(sc), f32::from(m))
}

/// Dequantises `n` weights of type `ty` from `data`. Arithmetic follows
/// ggml's reference order (scale × value, then the minimum), so results are
/// bit-identical to ggml's and the `gguf` Python package's.
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>, TrainerError> {
    let (block, size) = ty.block_layout().ok_or_else(|| {
        TrainerError::Unsupported(format!("ggml type {ty} (supported: {})", GgmlType::supported_names()))
    })?;
    if !n.is_multiple_of(block) || data.len() != n / block * size {
        return Err(format_err(format!(
            "{n} weights of {ty} need {} bytes in blocks of {block}, got {}",
            n / block * size,
            data.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    let blocks = data.chunks_exact(size);
    match ty {
        GgmlType::F32 => out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        GgmlType::F16 => out.extend(blocks.map(|b| half(b, 0))),
        GgmlType::BF16 => out.extend(blocks.map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))),
        GgmlType::Q8_0 => {
            for b in blocks {
                let d = half(b, 0);
                out.extend(b[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        // Q4_0/Q4_1: weight j < 16 is the low nibble of byte j, weight
        // j + 16 its high nibble.
        GgmlType::Q4_0 => {
            for b in blocks {
                let d = half(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| d * f32::from(i16::from(q & 0x0f) - 8)));
                out.extend(qs.iter().map(|&q| d * f32::from(i16::from(q >> 4) - 8)));
            }
        }
        GgmlType::Q4_1 => {
            for b in blocks {
                let (d, m) = (half(b, 0), half(b, 2));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| d * f32::from(q & 0x0f) + m));
                out.extend(qs.iter().map(|&q| d * f32::from(q >> 4) + m));
            }
        }
        // Q4_K: eight groups of 32; groups 2c and 2c+1 are the low and high
        // nibbles of the same 32 bytes.
        GgmlType::Q4_K => {
            for b in blocks {
                let (d, dmin) = (half(b, 0), half(b, 2));
                let (scales, qs) = (&b[4..16], &b[16..144]);
                for group in 0..8 {
                    let (sc, m) = k_scale_min(scales, group);
                    let (scale, min) = (d * sc, dmin * m);
                    let (bytes, shift) = (&qs[(group / 2) * 32..(group / 2) * 32 + 32], 4 * (group % 2));
                    out.extend(bytes.iter().map(|&q| scale * f32::from((q >> shift) & 0x0f) - min));
                }
            }
        }
        // Q5_K: as Q4_K, plus bit `group` of byte l of qh as the fifth bit
        // of weight l of each group.
        GgmlType::Q5_K => {
            for b in blocks {
                let (d, dmin) = (half(b, 0), half(b, 2));
                let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
                for group in 0..8 {
                    let (sc, m) = k_scale_min(scales, group);
                    let (scale, min) = (d * sc, dmin * m);
                    let (bytes, shift) = (&qs[(group / 2) * 32..(group / 2) * 32 + 32], 4 * (group % 2));
                    out.extend(bytes.iter().zip(qh).map(|(&q, &h)| {
                        let v = ((q >> shift) & 0x0f) | (((h >> group) & 1) << 4);
                        scale * f32::from(v) - min
                    }));
                }
            }
        }
        // Q6_K: two halves of 128 weights. In half c, weight 64s + j takes
        // its low four bits from nibble s of ql[64c + j] and its top two
        // bits from bits 2k..2k+2 of qh[32c + j % 32], k = 2s + j / 32; every
        // 16 weights share one signed 8-bit scale; d is the last two bytes.
        GgmlType::Q6_K => {
            for b in blocks {
                let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = half(b, 208);
                for i in 0..256 {
                    let (c, r) = (i / 128, i % 128);
                    let (s, j) = (r / 64, r % 64);
                    let low = (ql[64 * c + j] >> (4 * s)) & 0x0f;
                    let high = (qh[32 * c + j % 32] >> (2 * (2 * s + j / 32))) & 3;
                    let q = i16::from(low | (high << 4)) - 32;
                    let scale = d * f32::from(scales[i / 16] as i8);
                    out.push(scale * f32::from(q));
                }
            }
        }
        _ => unreachable!("block_layout covers exactly the supported types"),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds GGUF bytes field by field.
    #[derive(Default)]
    struct Builder(Vec<u8>);

    impl Builder {
        fn u32(mut self, v: u32) -> Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn bytes(mut self, b: &[u8]) -> Self {
            self.0.extend(b);
            self
        }
        fn string(self, s: &str) -> Self {
            self.u64(s.len() as u64).bytes(s.as_bytes())
        }
        fn header(version: u32, tensors: u64, kvs: u64) -> Self {
            Builder::default().bytes(b"GGUF").u32(version).u64(tensors).u64(kvs)
        }
        fn pad_to(mut self, alignment: usize) -> Self {
            while !self.0.len().is_multiple_of(alignment) {
                self.0.push(0);
            }
            self
        }
    }

    /// Two metadata entries (an aligned u32 and an i32 array), one string,
    /// and two F32 tensors [2 × 3] and [4] at 64-byte alignment.
    fn small_file() -> Vec<u8> {
        let b = Builder::header(3, 2, 4)
            .string("general.alignment")
            .u32(4)
            .u32(64)
            .string("general.name")
            .u32(8)
            .string("tiny")
            .string("some.ints")
            .u32(9)
            .u32(5)
            .u64(3)
            .bytes(&[1, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff, 7, 0, 0, 0])
            .string("some.flag")
            .u32(7)
            .bytes(&[1])
            .string("a.weight")
            .u32(2)
            .u64(3)
            .u64(2)
            .u32(0)
            .u64(0)
            .string("b.weight")
            .u32(1)
            .u64(4)
            .u32(0)
            .u64(64)
            .pad_to(64);
        let a: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let b = b.bytes(&a).pad_to(64);
        let data: Vec<u8> = [-1.0f32, 0.5, 2.0, 8.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        b.bytes(&data).0
    }

    #[test]
    fn header_metadata_and_tensors_of_a_hand_built_file() {
        let bytes = small_file();
        let h = parse_header(&bytes).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.alignment, 64);
        assert_eq!(h.data_offset % 64, 0);
        assert_eq!(h.get("general.name").and_then(Value::as_str), Some("tiny"));
        assert_eq!(h.get("some.flag"), Some(&Value::Bool(true)));
        assert_eq!(h.get("some.ints"), Some(&Value::Array(vec![Value::I32(1), Value::I32(-2), Value::I32(7)])));
        assert_eq!(h.tensors.len(), 2);
        let a = h.tensor("a.weight").unwrap();
        assert_eq!((a.shape(), a.elements(), a.ggml_type), (vec![2, 3], 6, GgmlType::F32));
        let values = dequantize(a.ggml_type, &bytes[h.data_offset..h.data_offset + 24], 6).unwrap();
        assert_eq!(values, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let b = h.tensor("b.weight").unwrap();
        let start = h.data_offset + b.offset as usize;
        assert_eq!(dequantize(b.ggml_type, &bytes[start..start + 16], 4).unwrap(), [-1.0, 0.5, 2.0, 8.0]);
    }

    #[test]
    fn refusals_name_what_cannot_be_read() {
        let err = |bytes: &[u8]| parse_header(bytes).unwrap_err().to_string();
        assert!(err(b"GGML\x03\0\0\0").contains("not a GGUF file"), "{}", err(b"GGML"));
        let v1 = Builder::header(1, 0, 0).0;
        assert!(err(&v1).contains("GGUF version 1"), "{}", err(&v1));
        let v9 = Builder::header(9, 0, 0).0;
        assert!(err(&v9).contains("GGUF version 9 (supported: versions 2 and 3)"), "{}", err(&v9));
        let big = Builder::header(3u32.swap_bytes(), 0, 0).0;
        assert!(err(&big).contains("big-endian GGUF"), "{}", err(&big));
        let odd_value = Builder::header(3, 0, 1).string("x.y").u32(13).u32(0).0;
        assert!(err(&odd_value).contains("metadata value type 13 (key x.y"), "{}", err(&odd_value));
        let mut truncated = small_file();
        truncated.truncate(truncated.len() - 1);
        assert!(err(&truncated).contains("b.weight (16 bytes at data offset 64) runs past the end"));
        let short = Builder::header(3, 1, 0).string("t").u32(1).0;
        assert!(err(&short).contains("file truncated"), "{}", err(&short));
        let misaligned =
            Builder::header(3, 1, 0).string("t").u32(1).u64(32).u32(0).u64(4).pad_to(32).bytes(&[0; 256]).0;
        assert!(err(&misaligned).contains("not 32-byte aligned"), "{}", err(&misaligned));
        let huge = Builder::header(3, 0, 1).string("k").u32(9).u32(8).u64(u64::MAX).0;
        assert!(err(&huge).contains("exceeds the file"), "{}", err(&huge));
        let many = Builder::header(3, 1 << 40, 0).0;
        assert!(err(&many).contains("1099511627776 tensors exceed the file"), "{}", err(&many));
        let scalar = Builder::header(3, 1, 0).string("s").u32(0).u32(0).u64(0).bytes(&[0; 16]).0;
        assert!(err(&scalar).contains("tensor s has 0 dimensions"), "{}", err(&scalar));

        // Unsupported tensor types parse (the header is still readable) but
        // are refused by name when their weights are asked for.
        let iq = Builder::header(3, 1, 0).string("w").u32(1).u64(256).u32(16).u64(0).pad_to(32).bytes(&[0; 66]).0;
        let h = parse_header(&iq).unwrap();
        let e = dequantize(h.tensors[0].ggml_type, &[0; 66], 256).unwrap_err().to_string();
        assert!(e.contains("ggml type IQ2_XXS (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)"), "{e}");
        assert_eq!(GgmlType(99).name(), "type 99");
        let e = unsupported_type(&TensorInfo { name: "w".into(), dims: vec![32], ggml_type: GgmlType(99), offset: 0 });
        assert!(e.to_string().contains("tensor w is stored as ggml type type 99"), "{e}");
    }

    #[test]
    fn f16_conversion_covers_normals_subnormals_and_specials() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn q4_blocks_decode_by_hand() {
        // Q4_0, d = 0.5: byte j holds weight j (low nibble) and j + 16 (high).
        let mut b = vec![0x00, 0x38]; // 0.5 as f16
        b.extend((0..16u8).map(|j| j | (15 - j) << 4));
        let w = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!(w[0], -4.0); // (0 - 8) · 0.5
        assert_eq!(w[15], 3.5); // (15 - 8) · 0.5
        assert_eq!(w[16], 3.5); // high nibble of byte 0 is 15
        // Q4_1: d = 1, m = -2.
        let mut b = vec![0x00, 0x3c, 0x00, 0xc0];
        b.extend([0x21u8; 16]);
        let w = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!((w[0], w[16]), (-1.0, 0.0));
        let e = dequantize(GgmlType::Q4_1, &b[..19], 32).unwrap_err().to_string();
        assert!(e.contains("need 20 bytes"), "{e}");
    }
}
