//! Errors collected across the whole definition, so a user sees every mistake at once (serde's
//! `Ctxt`).

/// Every error found so far.
#[derive(Default)]
pub struct Errors {
    all: Option<syn::Error>,
}

impl Errors {
    /// Records one more error.
    pub fn push(&mut self, e: syn::Error) {
        match &mut self.all {
            Some(all) => all.combine(e),
            None => self.all = Some(e),
        }
    }

    /// Records `message` at the span of `tokens`.
    pub fn at(&mut self, tokens: impl quote::ToTokens, message: impl std::fmt::Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    /// Whether any error was recorded.
    pub fn is_empty(&self) -> bool {
        self.all.is_none()
    }

    /// `Err` with every error recorded, or `Ok`.
    pub fn finish(self) -> syn::Result<()> {
        match self.all {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
