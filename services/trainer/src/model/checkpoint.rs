//! Loading a checkpoint directory: `config.json` and the safetensors
//! weights (one file or index-named shards), converted to f32.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;

use super::{LlamaConfig, Model, Tensor};
use crate::TrainerError;

impl Model {
    /// Loads `dir/config.json` and `dir/model.safetensors` (or the shards
    /// named by `model.safetensors.index.json`; memory-mapped), checking every tensor the
    /// config implies is present with its shape.
    pub fn load(dir: &Path) -> Result<Model, TrainerError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| TrainerError::io(p, e));
        let config: LlamaConfig = serde_json::from_slice(&read(&dir.join("config.json"))?)
            .map_err(|e| TrainerError::malformed(&dir.join("config.json"), e))?;
        config.check()?;
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<std::path::PathBuf> = if index.exists() {
            #[derive(Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let idx: Index = serde_json::from_slice(&read(&index)?).map_err(|e| TrainerError::malformed(&index, e))?;
            let mut names: Vec<&String> = idx.weight_map.values().collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut tensors = HashMap::new();
        for file in files {
            let handle = std::fs::File::open(&file).map_err(|e| TrainerError::io(&file, e))?;
            // Mapped, not read: only the f32 copies occupy memory, one shard
            // of raw bytes is never resident twice.
            // SAFETY: checkpoints are immutable inputs; a file truncated
            // while mapped is outside what the trainer supports.
            #[allow(unsafe_code)]
            let bytes = unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| TrainerError::io(&file, e))?;
            let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| TrainerError::malformed(&file, e))?;
            for (name, view) in st.tensors() {
                let data = to_f32(&view, &name)?;
                tensors.insert(name, Tensor { shape: view.shape().to_vec(), data });
            }
        }
        let model = Model { config, tensors };
        model.check_tensors()?;
        Ok(model)
    }
}

fn to_f32(view: &safetensors::tensor::TensorView<'_>, name: &str) -> Result<Vec<f32>, TrainerError> {
    use safetensors::Dtype;
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => {
            b.chunks_exact(2).map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)).collect()
        }
        Dtype::F16 => b.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
        other => return Err(TrainerError::Unsupported(format!("tensor {name} has dtype {other:?}"))),
    })
}

/// IEEE half → single precision.
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = (h >> 10) & 0x1f;
    let frac = u32::from(h & 0x3ff);
    let bits = match exp {
        0 if frac == 0 => sign,
        0 => {
            // Subnormal: normalise.
            let mut e = 127 - 15 + 1;
            let mut f = frac;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((f & 0x3ff) << 13)
        }
        0x1f => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((u32::from(exp) + 127 - 15) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}
