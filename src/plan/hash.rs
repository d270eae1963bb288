//! Content hashes of plan steps (the keys of cached results), written field
//! by field: every value is tagged or length-prefixed, so two different
//! settings never encode alike, and nothing depends on `Debug` output.

use crate::recipe::{
    Data, DataKind, InputSettings, LayerRule, MergeParams, OrderSpec, ParamValue, Saliency,
    Settings, TakeFrom,
};

pub struct ContentHash(blake3::Hasher);

impl ContentHash {
    /// A hash of one kind of content (`domain` keeps kinds apart).
    pub fn new(domain: &str) -> ContentHash {
        let mut h = ContentHash(blake3::Hasher::new());
        h.str(domain);
        h
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.update(s.as_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.update(&v.to_le_bytes());
        self
    }

    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.u64(v.to_bits())
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u64(u64::from(v))
    }

    /// A tag for `None`, else one for `Some` and the value.
    pub fn opt<T>(&mut self, v: Option<T>, each: impl FnOnce(&mut Self, T)) -> &mut Self {
        match v {
            None => self.u64(0),
            Some(v) => {
                self.u64(1);
                each(self, v);
                self
            }
        }
    }

    pub fn finish(&self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

/// Content that goes into a step's hash.
pub trait Hashed {
    fn hash_into(&self, h: &mut ContentHash);
}

impl Hashed for InputSettings {
    fn hash_into(&self, h: &mut ContentHash) {
        h.opt(self.weight, |h, v| {
            h.f64(v);
        })
        .opt(self.density, |h, v| {
            h.f64(v);
        })
        .opt(self.retain, |h, v| {
            h.f64(v);
        })
        .opt(self.using, |h, d| {
            h.u64(d.0 as u64);
        })
        .opt(self.gamma, |h, v| {
            h.f64(v);
        })
        .opt(self.epsilon, |h, v| {
            h.f64(v);
        });
    }
}

impl Hashed for MergeParams {
    fn hash_into(&self, h: &mut ContentHash) {
        for (key, value) in self.iter() {
            h.str(key.as_str());
            match value {
                ParamValue::Number(n) => h.f64(n),
                ParamValue::Bool(b) => h.bool(b),
            };
        }
        h.str("end of parameters");
    }
}

impl Hashed for Settings {
    fn hash_into(&self, h: &mut ContentHash) {
        h.opt(self.order.as_ref(), |h, order| match order {
            OrderSpec::Rotate => {
                h.str("rotate");
            }
            OrderSpec::First(k) => {
                h.str("first").u64(*k as u64);
            }
            OrderSpec::Fixed(ks) => {
                h.str("fixed").u64(ks.len() as u64);
                for k in ks {
                    h.u64(*k as u64);
                }
            }
        });
        h.opt(self.saliency, |h, s| {
            h.str(match s {
                Saliency::Obd => "obd",
                Saliency::Magnitude => "magnitude",
            });
        });
        h.opt(self.take, |h, t| match t {
            TakeFrom::Base => {
                h.str("base");
            }
            TakeFrom::Input(k) => {
                h.str("input").u64(k as u64);
            }
        });
        self.params.hash_into(h);
        self.defaults.hash_into(h);
        h.u64(self.inputs.len() as u64);
        for (k, s) in &self.inputs {
            h.u64(*k as u64);
            s.hash_into(h);
        }
        h.u64(self.gradients.len() as u64);
        for g in &self.gradients {
            h.opt(g.input, |h, i| {
                h.u64(i as u64);
            })
            .str(g.key.as_str())
            .u64(g.values.len() as u64);
            for v in &g.values {
                h.f64(*v);
            }
        }
    }
}

impl Hashed for LayerRule {
    fn hash_into(&self, h: &mut ContentHash) {
        h.u64(self.patterns.len() as u64);
        for p in &self.patterns {
            h.str(p.as_str());
        }
        self.settings.hash_into(h);
    }
}

/// A data source as sampling sees it (not its name or span).
impl Hashed for Data {
    fn hash_into(&self, h: &mut ContentHash) {
        h.str(match self.kind {
            DataKind::Jsonl => "jsonl",
            DataKind::Text => "text",
        })
        .str(&self.pattern)
        .str(&self.field)
        .opt(self.samples, |h, n| {
            h.u64(n);
        })
        .u64(self.seq_len)
        .u64(self.seed);
    }
}
