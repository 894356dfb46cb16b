//! The arguments of `#[tcc(...)]`: on the trait (`client`, `crate`), on a try method (`confirm`,
//! `cancel`, `branch`), on a saga step's action (`compensate`) and on a message action (`action`).
//! Parsing only; what they mean is checked in [`crate::model`].

use proc_macro2::TokenStream;
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::{Expr, ExprLit, ExprPath, Ident, Lit, LitStr, Path, Token};

use crate::errors::Errors;

/// One `key = value` argument, or the flag `action`.
struct Arg {
    key: Ident,
    value: Option<Expr>,
}

/// The one argument that is a flag, not `key = value`.
const FLAG: &str = "action";

fn parse_arg(input: ParseStream<'_>) -> syn::Result<Arg> {
    // `crate` is a keyword: accept any identifier as a key.
    let key = Ident::parse_any(input)?;
    if !input.peek(Token![=]) {
        if key.unraw() == FLAG {
            return Ok(Arg { key, value: None });
        }
        return Err(syn::Error::new(key.span(), format!("expected `{key} = ...`")));
    }
    input.parse::<Token![=]>()?;
    let value: Expr = input.parse()?;
    Ok(Arg { key, value: Some(value) })
}

/// The arguments in `tokens`, keeping the first of each key; duplicate and unknown keys are
/// reported to `errors`. `Err` only when the tokens are not `key = value, ...` at all.
fn parse_args(tokens: TokenStream, known: &[&str], errors: &mut Errors) -> syn::Result<Vec<Arg>> {
    let parser =
        |input: ParseStream<'_>| Punctuated::<Arg, Token![,]>::parse_terminated_with(input, parse_arg);
    let args = parser.parse2(tokens)?;
    let mut kept: Vec<Arg> = Vec::new();
    for arg in args {
        let key = arg.key.unraw().to_string();
        if !known.contains(&key.as_str()) {
            let expected = known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
            errors.push(syn::Error::new(
                arg.key.span(),
                format!("unknown argument `{key}`: expected one of {expected}"),
            ));
        } else if kept.iter().any(|k| k.key.unraw() == key) {
            errors.push(syn::Error::new(arg.key.span(), format!("duplicate argument `{key}`")));
        } else {
            kept.push(arg);
        }
    }
    Ok(kept)
}

fn ident_value(arg: &Arg, what: &str, errors: &mut Errors) -> Option<Ident> {
    let Some(value) = &arg.value else {
        errors.at(&arg.key, format!("expected `{} = ...`: {what}", arg.key));
        return None;
    };
    match value {
        Expr::Path(ExprPath { path, qself: None, attrs }) if attrs.is_empty() => match path.get_ident() {
            Some(ident) => Some(ident.clone()),
            None => {
                errors.push(syn::Error::new_spanned(path, format!("expected {what}, a plain name")));
                None
            }
        },
        other => {
            errors.push(syn::Error::new_spanned(other, format!("expected {what}, a plain name")));
            None
        }
    }
}

/// The arguments of `#[tcc(...)]` on the trait.
#[derive(Default)]
pub struct TraitArgs {
    /// `client = Name`: the client stub's name instead of `{Trait}Client`.
    pub client: Option<Ident>,
    /// `crate = path`: where `tcc_http` is, instead of `::tcc_http`.
    pub krate: Option<Path>,
}

impl TraitArgs {
    pub fn parse(tokens: TokenStream, errors: &mut Errors) -> TraitArgs {
        let mut out = TraitArgs::default();
        let args = match parse_args(tokens, &["client", "crate"], errors) {
            Ok(args) => args,
            Err(e) => {
                errors.push(e);
                return out;
            }
        };
        for arg in args {
            match arg.key.unraw().to_string().as_str() {
                "client" => out.client = ident_value(&arg, "the client stub's type name", errors),
                _ => match &arg.value {
                    Some(Expr::Path(ExprPath { path, qself: None, .. })) => out.krate = Some(path.clone()),
                    Some(other) => errors.push(syn::Error::new_spanned(
                        other,
                        "expected the path of the tcc-http crate, such as `::tcc_http`",
                    )),
                    None => errors.at(&arg.key, "expected `crate = path`"),
                },
            }
        }
        out
    }
}

/// What a method's `#[tcc(...)]` makes it: the kind is told by the keys given, whatever their values.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TCC operation's try (`confirm`, `cancel`, `branch`; also a bare `#[tcc]`).
    Try,
    /// A saga step's action (`compensate`).
    Step,
    /// A message action (`action`).
    Action,
}

/// The arguments of `#[tcc(...)]` on a try method, a saga step's action or a message action.
pub struct OperationArgs {
    /// The attribute itself, for errors about missing arguments.
    pub span_of: TokenStream,
    /// `confirm = method`.
    pub confirm: Option<Ident>,
    /// `cancel = method`.
    pub cancel: Option<Ident>,
    /// `branch = "id"`: the default branch id of the client stub's calls.
    pub branch: Option<LitStr>,
    /// `compensate = method`: the compensation of a saga step.
    pub compensate: Option<Ident>,
    /// What the keys make the method.
    pub kind: Kind,
    /// Some argument was given but could not be read (already reported): what is missing may only
    /// be unreadable, so no more errors about it.
    pub unreadable: bool,
}

impl OperationArgs {
    /// `attr` is the whole `#[tcc...]` attribute.
    pub fn parse(attr: &syn::Attribute, errors: &mut Errors) -> OperationArgs {
        let mut out = OperationArgs {
            span_of: quote::quote!(#attr),
            confirm: None,
            cancel: None,
            branch: None,
            compensate: None,
            kind: Kind::Try,
            unreadable: false,
        };
        let tokens = match &attr.meta {
            syn::Meta::Path(_) => TokenStream::new(),
            syn::Meta::List(list) => list.tokens.clone(),
            syn::Meta::NameValue(nv) => {
                errors.push(syn::Error::new_spanned(nv, "expected `#[tcc(confirm = ..., cancel = ...)]`"));
                out.unreadable = true;
                return out;
            }
        };
        let args = match parse_args(tokens, &["confirm", "cancel", "branch", "compensate", "action"], errors)
        {
            Ok(args) => args,
            Err(e) => {
                errors.push(e);
                out.unreadable = true;
                return out;
            }
        };
        let has = |key: &str| args.iter().find(|a| a.key.unraw() == key).map(|a| &a.key);
        // One kind per method: the arguments of another kind are errors at their keys.
        let (kind, foreign): (Kind, &[&str]) = if let Some(action) = has("action") {
            if let Some(value) =
                &args.iter().find(|a| a.key.unraw() == "action").and_then(|a| a.value.as_ref())
            {
                errors.at(value, format!("`{action}` takes no value: write `#[tcc(action)]`"));
            }
            (Kind::Action, &["confirm", "cancel", "branch", "compensate"])
        } else if has("compensate").is_some() {
            (Kind::Step, &["confirm", "cancel", "branch"])
        } else {
            (Kind::Try, &[])
        };
        out.kind = kind;
        let what = match kind {
            Kind::Try => "",
            Kind::Step => "`compensate` makes this method a saga step's action, which has no",
            Kind::Action => "`action` makes this method a message action, which has no",
        };
        for arg in &args {
            let key = arg.key.unraw().to_string();
            if foreign.contains(&key.as_str()) {
                let instead = match (kind, key.as_str()) {
                    (Kind::Action, "compensate") => {
                        "a message action is never undone; for a saga step write `#[tcc(compensate = ...)]` alone"
                    }
                    (_, "branch") => "its branch id is its position in the saga or message",
                    _ => {
                        "a TCC operation takes `confirm = ..., cancel = ...`, a saga step `compensate = ...`, a message action `action`"
                    }
                };
                errors.at(&arg.key, format!("{what} `{key}`: {instead}"));
                out.unreadable = true;
            }
        }
        for arg in args {
            match arg.key.unraw().to_string().as_str() {
                "action" => {}
                "compensate" => {
                    out.compensate = ident_value(&arg, "the compensation method's name", errors);
                    out.unreadable |= out.compensate.is_none();
                }
                "confirm" => {
                    out.confirm = ident_value(&arg, "the confirm method's name", errors);
                    out.unreadable |= out.confirm.is_none();
                }
                "cancel" => {
                    out.cancel = ident_value(&arg, "the cancel method's name", errors);
                    out.unreadable |= out.cancel.is_none();
                }
                _ => match &arg.value {
                    Some(Expr::Lit(ExprLit { lit: Lit::Str(s), .. })) => out.branch = Some(s.clone()),
                    Some(other) => errors
                        .push(syn::Error::new_spanned(other, "expected the branch id as a string literal")),
                    None => errors.at(&arg.key, "expected `branch = \"id\"`"),
                },
            }
        }
        out
    }
}
