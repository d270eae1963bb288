//! Calibration statistics by input and data source, as the driver computed
//! or read them, and OBD's and RegMean's view of them for one tensor.

use super::error::{CalibrationFailure, ExecError};
use crate::calibrate::{ActStats, Grams};
use crate::merge::ObdStats;
use crate::recipe::{DataId, InputRef, Merge, Recipe};
use std::collections::HashMap;

#[derive(Default)]
pub struct Statistics {
    stats: HashMap<(InputRef, DataId), ActStats>,
    grams: HashMap<(InputRef, DataId), Grams>,
}

impl Statistics {
    pub fn contains(&self, input: InputRef, data: DataId) -> bool {
        self.stats.contains_key(&(input, data))
    }

    pub fn insert(&mut self, input: InputRef, data: DataId, stats: ActStats) {
        self.stats.insert((input, data), stats);
    }

    pub fn contains_grams(&self, input: InputRef, data: DataId) -> bool {
        self.grams.contains_key(&(input, data))
    }

    pub fn insert_grams(&mut self, input: InputRef, data: DataId, grams: Grams) {
        self.grams.insert((input, data), grams);
    }

    /// RegMean: each input's Gram matrix of the input of tensor `name`'s
    /// linear layer, read from the cache; empty when `name` is not a linear
    /// layer's weight (no input has a matrix for it).
    pub fn grams(
        &self,
        recipe: &Recipe,
        merge: &Merge,
        using: &[Option<DataId>],
        name: &str,
    ) -> Result<Vec<Vec<f32>>, ExecError> {
        let Some(module) = name.strip_suffix(".weight") else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        for (input, using) in merge.inputs.iter().zip(using) {
            let fail = |data: DataId, source| ExecError::Calibration {
                input: recipe.input_name(input.model).to_string(),
                data: recipe.data[data.0].name.clone(),
                source: Box::new(source),
            };
            let Some(data) = *using else {
                return Ok(Vec::new());
            };
            let grams = self
                .grams
                .get(&(input.model, data))
                .ok_or_else(|| fail(data, CalibrationFailure::NotComputed))?;
            match grams.matrix(module) {
                Ok(Some(m)) => found.push(m),
                Ok(None) if found.is_empty() => return Ok(Vec::new()),
                Ok(None) => {
                    return Err(fail(
                        data,
                        CalibrationFailure::NoModule {
                            tensor: name.to_string(),
                            module: module.to_string(),
                        },
                    ));
                }
                Err(e) => return Err(fail(data, CalibrationFailure::Calibrate(e))),
            }
        }
        Ok(found)
    }

    /// Each input's OBD statistics for tensor `name` of `merge`, given each
    /// input's `using` data (`None`: no data, so magnitude).
    pub fn obd<'s>(
        &'s self,
        recipe: &Recipe,
        merge: &Merge,
        using: &[Option<DataId>],
        name: &str,
    ) -> Result<Vec<Option<ObdStats<'s>>>, ExecError> {
        merge
            .inputs
            .iter()
            .zip(using)
            .map(|(input, using)| {
                let Some(data) = *using else { return Ok(None) };
                let fail = |source| ExecError::Calibration {
                    input: recipe.input_name(input.model).to_string(),
                    data: recipe.data[data.0].name.clone(),
                    source: Box::new(source),
                };
                let found = self
                    .stats
                    .get(&(input.model, data))
                    .ok_or_else(|| fail(CalibrationFailure::NotComputed))?;
                if name.ends_with(".bias") {
                    return Ok(Some(ObdStats::Tokens(found.tokens as f64)));
                }
                let module = name.strip_suffix(".weight").unwrap_or(name);
                let sums = found.sums.get(module).ok_or_else(|| {
                    fail(CalibrationFailure::NoModule {
                        tensor: name.to_string(),
                        module: module.to_string(),
                    })
                })?;
                Ok(Some(ObdStats::Columns(sums)))
            })
            .collect()
    }
}
