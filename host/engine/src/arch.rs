//! The seam between the scheduler and a model architecture: the [`Architecture`] trait
//! (one batched step: many sequences, their slots, logits out), the choice of
//! architecture by a GGUF's `general.architecture`, and the parts the architectures
//! share: metadata reading, rotary tables, and attention of every entry of a step over
//! its slot.
//!
//! Each architecture lives in its own file (`llama.rs`, `qwen2.rs`, `qwen3.rs`,
//! `gemma3.rs`), as in candle-transformers, and follows candle's reference model for it
//! op for op, so its logits can be held to the reference bit for bit.

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;
use rayon::prelude::*;

use super::kv_cache::{KvCache, KvDtype};
use super::qmatmul::Linear;
use super::EngineError;

/// The architectures lynx serves, by their GGUF `general.architecture`.
pub const SUPPORTED: [&str; 4] = ["llama", "qwen2", "qwen3", "gemma3"];

/// One sequence's part of a step: `tokens` at positions `pos..`, in `slot`.
pub struct Entry<'a> {
    pub slot: usize,
    pub pos: usize,
    pub tokens: &'a [u32],
    /// Which of its rows' logits are wanted.
    pub logits: Logits,
}

/// The logits an entry wants from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None: a prompt chunk before the last.
    None,
    /// After its last token: what the next token is sampled from.
    Last,
    /// After each of its tokens: a prompt's own log-probabilities (`echo`).
    Every,
}

/// A model the scheduler can run: weights, shape and one batched forward pass.
pub trait Architecture: Send + Sync {
    /// The embeddings, final norm, output and shape, which every architecture has.
    fn trunk(&self) -> &Trunk;
    /// Runs one step. Returns the logits the entries asked for (see [`Logits`]), in
    /// entry order and token order, as `[rows, vocab]`.
    fn forward(&self, cache: &KvCache, entries: &[Entry]) -> Result<Option<Tensor>, EngineError>;

    /// `general.architecture` of the file it was loaded from.
    fn name(&self) -> &'static str {
        self.trunk().name
    }

    /// Layers, KV heads and head size: what one cached position holds.
    fn kv_shape(&self) -> KvShape {
        let t = self.trunk();
        KvShape {
            layers: t.layers,
            kv_heads: t.n_kv_head,
            head_dim: t.head_dim,
        }
    }

    /// Positions the rotary tables cover.
    fn max_positions(&self) -> usize {
        self.trunk().max_positions
    }

    /// Bytes of KV cache one position takes (keys and values, every layer).
    fn kv_bytes_per_position(&self, dtype: KvDtype) -> usize {
        let s = self.kv_shape();
        s.layers * 2 * s.kv_heads * s.head_dim * dtype.bytes()
    }

    /// An f32 cache of `slots` slots of `capacity` positions each: bit for bit
    /// candle's reference.
    fn kv_cache(&self, slots: usize, capacity: usize) -> Result<KvCache, EngineError> {
        self.kv_cache_as(slots, capacity, KvDtype::F32)
    }

    /// A cache of `slots` slots of `capacity` positions each, stored as `dtype`.
    fn kv_cache_as(
        &self,
        slots: usize,
        capacity: usize,
        dtype: KvDtype,
    ) -> Result<KvCache, EngineError> {
        let s = self.kv_shape();
        KvCache::new(
            slots,
            s.layers,
            (s.kv_heads, s.head_dim),
            capacity.min(self.max_positions()),
            dtype,
        )
    }
}

#[derive(Clone, Copy, Debug)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// What every architecture keeps besides its layers.
pub struct Trunk {
    pub name: &'static str,
    pub embed: Embedding,
    pub norm: RmsNorm,
    /// The output matmul: `output.weight`, or the embeddings when they are tied.
    pub output: Linear,
    pub hidden: usize,
    pub layers: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub eps: f64,
    pub max_positions: usize,
}

impl Trunk {
    /// The trunk of a GGUF under `md`'s prefix; the head size is `head_dim_key`'s
    /// value when given (gemma3's `attention.key_length`), else width / heads.
    pub fn load<R: std::io::Seek + std::io::Read>(
        md: &Meta,
        reader: &mut R,
        head_dim_key: Option<&str>,
        max_positions: usize,
    ) -> Result<Self, EngineError> {
        let n_head = md.usize("attention.head_count")?;
        let n_kv_head = md.usize("attention.head_count_kv")?;
        let hidden = md.usize("embedding_length")?;
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(EngineError::Model(format!(
                "inconsistent {} shape: {n_head} heads over {n_kv_head} KV heads",
                md.prefix
            )));
        }
        let head_dim = match head_dim_key {
            Some(key) => md.usize(key)?,
            None if hidden % n_head == 0 => hidden / n_head,
            None => {
                return Err(EngineError::Model(format!(
                    "inconsistent {} shape: {hidden} wide over {n_head} heads",
                    md.prefix
                )))
            }
        };
        let eps = f64::from(md.f32_or("attention.layer_norm_rms_epsilon", 1e-6)?);
        let device = Device::Cpu;
        let embed_q = md.ct.tensor(reader, "token_embd.weight", &device)?;
        let embed = Embedding::new(embed_q.dequantize(&device)?, hidden);
        let norm =
            RmsNorm::from_qtensor(md.ct.tensor(reader, "output_norm.weight", &device)?, eps)?;
        let output = match md.ct.tensor(reader, "output.weight", &device) {
            Ok(t) => t,
            Err(_) => embed_q,
        };
        Ok(Self {
            name: md.prefix,
            embed,
            norm,
            output: Linear::from_qtensor(output)?,
            hidden,
            layers: md.usize("block_count")?,
            n_head,
            n_kv_head,
            head_dim,
            eps,
            max_positions,
        })
    }

    /// The step's token embeddings (`[1, n, hidden]`) and each entry's row count,
    /// after checking the entries fit the cache.
    pub fn embed(
        &self,
        cache: &KvCache,
        entries: &[Entry],
    ) -> Result<(Tensor, Vec<usize>), EngineError> {
        check_entries(cache, entries)?;
        let spans = entries.iter().map(|e| e.tokens.len()).collect();
        Ok((self.embed.forward(&step_ids(entries)?)?, spans))
    }

    /// The logits of the entries that want them, from the last layer's `x`.
    pub fn logits(&self, x: &Tensor, entries: &[Entry]) -> Result<Option<Tensor>, EngineError> {
        let x = self.norm.forward(x)?.squeeze(0)?;
        logits(&self.output, &x, entries)
    }

    /// The attention shape of a layer with this trunk's heads.
    pub fn attn<'a>(
        &self,
        rope: &'a Rope,
        window: Option<usize>,
        qk_norm: Option<(&'a RmsNorm, &'a RmsNorm)>,
    ) -> AttnShape<'a> {
        AttnShape {
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
            rope,
            window,
            qk_norm,
        }
    }
}

/// One layer's quantized weights, by their names under `blk.{layer}.`.
pub struct LayerTensors<'a, R> {
    pub md: &'a Meta<'a>,
    pub reader: &'a mut R,
    pub layer: usize,
}

impl<R: std::io::Seek + std::io::Read> LayerTensors<'_, R> {
    pub fn linear(&mut self, part: &str) -> Result<Linear, EngineError> {
        let name = format!("blk.{}.{part}.weight", self.layer);
        Linear::from_qtensor(self.md.ct.tensor(self.reader, &name, &Device::Cpu)?)
    }

    pub fn norm(&mut self, part: &str, eps: f64) -> Result<RmsNorm, EngineError> {
        let name = format!("blk.{}.{part}.weight", self.layer);
        Ok(RmsNorm::from_qtensor(
            self.md.ct.tensor(self.reader, &name, &Device::Cpu)?,
            eps,
        )?)
    }

    /// A tensor dequantized to f32 (biases).
    pub fn f32(&mut self, name: &str) -> Result<Tensor, EngineError> {
        let name = format!("blk.{}.{name}", self.layer);
        Ok(self
            .md
            .ct
            .tensor(self.reader, &name, &Device::Cpu)?
            .dequantize(&Device::Cpu)?)
    }
}

/// Loads the architecture `general.architecture` names, or says which are served.
pub fn load<R: std::io::Seek + std::io::Read>(
    ct: &gguf_file::Content,
    reader: &mut R,
    max_positions: usize,
) -> Result<Box<dyn Architecture>, EngineError> {
    let arch = architecture(ct);
    Ok(match arch.as_str() {
        "llama" => Box::new(super::llama::Llama::from_gguf(ct, reader, max_positions)?),
        "qwen2" => Box::new(super::qwen2::from_gguf(ct, reader, max_positions)?),
        "qwen3" => Box::new(super::qwen3::from_gguf(ct, reader, max_positions)?),
        "gemma3" => Box::new(super::gemma3::Gemma3::from_gguf(ct, reader, max_positions)?),
        other => {
            return Err(EngineError::Model(format!(
                "architecture {other:?} is not served (lynx serves {})",
                SUPPORTED.join(", ")
            )))
        }
    })
}

/// The file's `general.architecture` ("" when it does not say).
pub fn architecture(ct: &gguf_file::Content) -> String {
    ct.metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default()
}

/// The model's trained context (2048 when the GGUF does not say).
pub fn context_len(ct: &gguf_file::Content) -> usize {
    let key = format!("{}.context_length", architecture(ct));
    ct.metadata
        .get(&key)
        .and_then(|v| v.to_u32().ok())
        .map_or(2048, |n| n as usize)
}

/// An architecture's metadata, read under its prefix (`llama.`, `gemma3.`, ...).
pub struct Meta<'a> {
    pub ct: &'a gguf_file::Content,
    pub prefix: &'static str,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&gguf_file::Value, EngineError> {
        let key = format!("{}.{key}", self.prefix);
        self.ct
            .metadata
            .get(&key)
            .ok_or_else(|| EngineError::Model(format!("GGUF metadata {key} is missing")))
    }

    pub fn has(&self, key: &str) -> bool {
        self.ct
            .metadata
            .contains_key(&format!("{}.{key}", self.prefix))
    }

    pub fn usize(&self, key: &str) -> Result<usize, EngineError> {
        Ok(self.get(key)?.to_u32()? as usize)
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize, EngineError> {
        if !self.has(key) {
            return Ok(default);
        }
        self.usize(key)
    }

    pub fn f32_or(&self, key: &str, default: f32) -> Result<f32, EngineError> {
        if !self.has(key) {
            return Ok(default);
        }
        Ok(self.get(key)?.to_f32()?)
    }

    pub fn string(&self, key: &str) -> Option<String> {
        self.get(key).ok()?.to_string().ok().cloned()
    }

    /// The position multiplier of linear rope scaling (`rope.scaling.type = linear`):
    /// 1 / `rope.scaling.factor`, else 1.
    pub fn rope_scale(&self) -> Result<f32, EngineError> {
        match self.string("rope.scaling.type").as_deref() {
            Some("linear") => Ok(1.0 / self.f32_or("rope.scaling.factor", 1.0)?),
            _ => Ok(1.0),
        }
    }

    /// Every layer of `trunk`, each read by `load` from its `blk.{i}.` tensors.
    pub fn layers<R, L>(
        &self,
        reader: &mut R,
        trunk: &Trunk,
        mut load: impl FnMut(&mut LayerTensors<'_, R>) -> Result<L, EngineError>,
    ) -> Result<Vec<L>, EngineError> {
        (0..trunk.layers)
            .map(|layer| {
                load(&mut LayerTensors {
                    md: self,
                    reader: &mut *reader,
                    layer,
                })
            })
            .collect()
    }
}

/// Rotary position tables for one base, as candle's quantized models compute them,
/// applied either to interleaved pairs (GGUF llama, whose q/k rows are permuted) or to
/// the two halves of each head (NeoX style: qwen2, gemma3).
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// `cos`/`sin` as plain rows (`[position][dim / 2]`) for decode tokens.
    cos_rows: Vec<f32>,
    sin_rows: Vec<f32>,
    half: usize,
    neox: bool,
}

impl Rope {
    /// Tables for `positions` positions of a `dim`-wide rotation. `freq_factors` divide
    /// the frequencies (llama 3.1's `rope_freqs`), `scale` multiplies the positions
    /// (linear rope scaling); neither changes the tables when 1.
    pub fn new(
        (dim, base): (usize, f32),
        positions: usize,
        freq_factors: Option<&[f32]>,
        scale: f32,
        neox: bool,
    ) -> Result<Self, EngineError> {
        let device = Device::Cpu;
        let theta: Vec<f32> = (0..dim)
            .step_by(2)
            .enumerate()
            .map(|(k, i)| {
                let f = 1f32 / base.powf(i as f32 / dim as f32);
                freq_factors.and_then(|ff| ff.get(k)).map_or(f, |d| f / d)
            })
            .collect();
        let half = theta.len();
        let theta = Tensor::new(theta.as_slice(), &device)?;
        let mut pos = Tensor::arange(0, positions as u32, &device)?.to_dtype(DType::F32)?;
        if scale != 1.0 {
            pos = (pos * f64::from(scale))?;
        }
        let angles = pos
            .reshape((positions, 1))?
            .matmul(&theta.reshape((1, half))?)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        Ok(Self {
            cos_rows: cos.flatten_all()?.to_vec1()?,
            sin_rows: sin.flatten_all()?.to_vec1()?,
            cos,
            sin,
            half,
            neox,
        })
    }

    /// Rotates `x`, `[1, heads, t, head_dim]` (contiguous), at positions `pos..pos + t`.
    fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor, EngineError> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        Ok(if self.neox {
            candle_nn::rotary_emb::rope(x, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope_i(x, &cos, &sin)?
        })
    }

    /// Rotates every head of one token's `x` in place, with candle's kernel formula.
    fn apply_row(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        let angles = pos * self.half..(pos + 1) * self.half;
        let (cos, sin) = (&self.cos_rows[angles.clone()], &self.sin_rows[angles]);
        for head in x.chunks_exact_mut(head_dim) {
            if self.neox {
                let (a, b) = head.split_at_mut(head_dim / 2);
                for ((x1, x2), (c, s)) in a.iter_mut().zip(b).zip(cos.iter().zip(sin)) {
                    let (u, v) = (*x1, *x2);
                    *x1 = u * c - v * s;
                    *x2 = u * s + v * c;
                }
            } else {
                for (pair, (c, s)) in head.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            }
        }
    }
}

/// How one layer's attention is shaped.
pub struct AttnShape<'a> {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub rope: &'a Rope,
    /// Keys further back than this many positions are not seen (sliding-window layers).
    pub window: Option<usize>,
    /// Per-head RMS norms of queries and keys, before rotation (gemma3).
    pub qk_norm: Option<(&'a RmsNorm, &'a RmsNorm)>,
}

/// Refuses a step whose entries do not fit the cache.
pub fn check_entries(cache: &KvCache, entries: &[Entry]) -> Result<(), EngineError> {
    for e in entries {
        if e.tokens.is_empty() || e.pos + e.tokens.len() > cache.capacity || e.slot >= cache.slots()
        {
            return Err(EngineError::Model(format!(
                "step entry out of bounds: slot {}, positions {}..{} of {}",
                e.slot,
                e.pos,
                e.pos + e.tokens.len(),
                cache.capacity
            )));
        }
    }
    Ok(())
}

/// The step's token ids as `[1, n]`.
pub fn step_ids(entries: &[Entry]) -> Result<Tensor, EngineError> {
    let ids: Vec<u32> = entries
        .iter()
        .flat_map(|e| e.tokens.iter().copied())
        .collect();
    Ok(Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?)
}

/// The logits (`[rows, vocab]`) the entries asked for, from the final hidden states
/// `x` (`[n, hidden]`); `None` when none did. Each row goes through the output matmul as
/// a sequence of its own.
pub fn logits(
    output: &Linear,
    x: &Tensor,
    entries: &[Entry],
) -> Result<Option<Tensor>, EngineError> {
    let Some(rows) = wanted_rows(x, entries)? else {
        return Ok(None);
    };
    let spans = vec![1; rows.dim(0)?];
    Ok(Some(
        output.forward(&rows.unsqueeze(0)?, &spans)?.squeeze(0)?,
    ))
}

/// The rows of `x` (`[n, hidden]`) whose logits the entries want; `None` when none does.
fn wanted_rows(x: &Tensor, entries: &[Entry]) -> Result<Option<Tensor>, EngineError> {
    let mut wanted = Vec::new();
    let mut start = 0;
    for e in entries {
        let end = start + e.tokens.len();
        match e.logits {
            Logits::None => {}
            Logits::Last => wanted.push((end - 1) as u32),
            Logits::Every => wanted.extend(start as u32..end as u32),
        }
        start = end;
    }
    if wanted.is_empty() {
        return Ok(None);
    }
    Ok(Some(x.index_select(
        &Tensor::new(wanted.as_slice(), &Device::Cpu)?,
        0,
    )?))
}

/// Every entry's attention at layer `li`, given the step's projections (`[1, n, ..]`);
/// returns `[1, n, n_head * head_dim]`. New keys and values go into the cache first,
/// one entry after the other; then the sequences attend in parallel.
pub fn attention(
    cache: &KvCache,
    li: usize,
    entries: &[Entry],
    shape: &AttnShape,
    (q, k, v): (Tensor, Tensor, Tensor),
) -> Result<Tensor, EngineError> {
    let hd = shape.head_dim;
    let (q, k) = match shape.qk_norm {
        Some((qn, kn)) => {
            let n = q.dim(1)?;
            let norm = |x: &Tensor, heads: usize, norm: &RmsNorm| -> Result<Tensor, EngineError> {
                let x = x.reshape((1, n, heads, hd))?;
                Ok(norm.forward(&x)?.reshape((1, n, heads * hd))?)
            };
            (norm(&q, shape.n_head, qn)?, norm(&k, shape.n_kv_head, kn)?)
        }
        None => (q, k),
    };
    let mut queries = Vec::with_capacity(entries.len());
    let mut start = 0;
    for e in entries {
        let t = e.tokens.len();
        let (q, k, v) = (
            q.narrow(1, start, t)?,
            k.narrow(1, start, t)?,
            v.narrow(1, start, t)?,
        );
        let (q, k, v) = if t == 1 {
            // One token: rotated in place with candle's kernel formula, which saves a
            // dozen tensor ops per sequence and layer.
            let row = |x: &Tensor, heads: usize, rotate: bool| -> Result<Tensor, EngineError> {
                let mut x = x.flatten_all()?.to_vec1::<f32>()?;
                if rotate {
                    shape.rope.apply_row(&mut x, hd, e.pos);
                }
                Ok(Tensor::from_vec(x, (1, heads, 1, hd), &Device::Cpu)?)
            };
            (
                row(&q, shape.n_head, true)?,
                row(&k, shape.n_kv_head, true)?,
                row(&v, shape.n_kv_head, false)?,
            )
        } else {
            let heads = |x: &Tensor, n: usize| -> candle_core::Result<Tensor> {
                x.reshape((1, t, n, hd))?.transpose(1, 2)?.contiguous()
            };
            (
                shape.rope.apply(&heads(&q, shape.n_head)?, e.pos)?,
                shape.rope.apply(&heads(&k, shape.n_kv_head)?, e.pos)?,
                heads(&v, shape.n_kv_head)?,
            )
        };
        cache.write((e.slot, li, e.pos), &k, &v)?;
        queries.push(q);
        start += t;
    }
    let outs = entries
        .par_iter()
        .zip(&queries)
        .map(|(e, q)| cache.attend((e.slot, li, e.pos), q, shape.window))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor::cat(&outs, 1)?)
}
