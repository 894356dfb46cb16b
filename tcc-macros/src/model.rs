//! From syntax to a validated model: the service (trait), its methods, its TCC operations, its saga
//! steps and its message actions. Every rule of the attribute is checked here, all errors collected
//! before giving up.

use std::collections::HashMap;

use quote::{ToTokens, format_ident};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{
    Attribute, Block, FnArg, GenericArgument, Ident, ItemTrait, Pat, Path, PathArguments, ReturnType,
    Signature, TraitItem, TraitItemFn, Type,
};

use crate::attrs::{Kind, OperationArgs, TraitArgs};
use crate::errors::Errors;

/// Names the generated client stub defines itself, which a try, step or action may not take.
pub const CLIENT_METHODS: &[&str] = &["new", "base_url", "with_branch", "with_try_attempts"];

/// The provided method the attribute adds to the trait.
pub const INTO_PARTICIPANT: &str = "into_participant";

/// Longest operation name the participant runtime accepts (`tcc_http::participant::MAX_OPERATION_NAME`).
const MAX_OPERATION_NAME: usize = 64;

/// Longest branch id (`tcc_core::model::MAX_ID_LEN`).
const MAX_BRANCH_ID: usize = 128;

/// A `#[tcc]` trait, validated.
pub struct Service {
    /// The trait as written, minus the `#[tcc]` helper attributes and the methods (rendered anew).
    pub item: ItemTrait,
    /// The path of the runtime crate.
    pub krate: Path,
    /// The client stub's name.
    pub client: Ident,
    /// Every method, in order.
    pub methods: Vec<Method>,
    /// Every operation, in the order of their try methods.
    pub ops: Vec<Operation>,
    /// Every saga step, in the order of their action methods.
    pub steps: Vec<SagaStep>,
    /// Every message action (indexes into `methods`), in order.
    pub actions: Vec<usize>,
    /// Where the participant keeps its state: what every method's context says.
    pub store: Store,
}

/// The participant store a service's methods run on, from the type of their `ctx`.
#[derive(Clone)]
pub enum Store {
    /// `ctx: TccContext`: staged writes over sled.
    Sled,
    /// `ctx: &mut SqlContext<DB>`: statements in a transaction of database `DB`.
    Sql(Box<Type>),
}

impl Store {
    fn describe(&self) -> String {
        match self {
            Store::Sled => "`TccContext`".to_owned(),
            Store::Sql(db) => format!("`&mut SqlContext<{}>`", type_text(db)),
        }
    }

    fn same(&self, other: &Store) -> bool {
        match (self, other) {
            (Store::Sled, Store::Sled) => true,
            (Store::Sql(a), Store::Sql(b)) => same_type(a, b),
            _ => false,
        }
    }
}

/// A parameter after `ctx`.
pub struct Param {
    /// Its name in the generated client (the pattern's name, or `argN`).
    pub name: Ident,
    /// Its type.
    pub ty: Type,
}

/// One method of the trait.
pub struct Method {
    /// Its attributes, minus `#[tcc]`.
    pub attrs: Vec<Attribute>,
    /// The signature as written.
    pub sig: Signature,
    /// The default body, if any.
    pub default: Option<Block>,
    /// The parameters after `ctx`.
    pub params: Vec<Param>,
    /// `T` of `Result<T, E>`.
    pub ok: Type,
    /// `E` of `Result<T, E>`.
    pub err: Type,
    /// The store its context says, and where it says it.
    pub store: (Store, proc_macro2::Span),
}

impl Method {
    /// The method's name, which is also its operation's name on the wire.
    pub fn name(&self) -> String {
        self.sig.ident.unraw().to_string()
    }

    /// The `#[doc]` attributes.
    pub fn docs(&self) -> impl Iterator<Item = &Attribute> {
        self.attrs.iter().filter(|a| a.path().is_ident("doc"))
    }
}

/// A TCC operation: its try, confirm and cancel methods (indexes into [`Service::methods`]).
pub struct Operation {
    pub try_: usize,
    pub confirm: usize,
    pub cancel: usize,
    /// The client stub's default branch id.
    pub branch: String,
}

/// A saga step: its action and its compensation (indexes into [`Service::methods`]).
pub struct SagaStep {
    pub action: usize,
    pub compensate: usize,
}

fn is_tcc(attr: &Attribute) -> bool {
    attr.path().is_ident("tcc")
}

/// Same tokens, same type: what "the same parameters" means at macro time.
fn same_type(a: &Type, b: &Type) -> bool {
    a.to_token_stream().to_string() == b.to_token_stream().to_string()
}

fn type_text(ty: &Type) -> String {
    let text = ty.to_token_stream().to_string();
    // `Result < () , E >` reads better without the spaces quote puts around every token.
    text.replace(" < ", "<").replace(" >", ">").replace("< ", "<").replace(" ,", ",").replace(" :: ", "::")
}

fn valid_branch(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_BRANCH_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// `Some(inner)` if `ty` is `Result<T, E>` (by its last path segment, as written).
fn result_types(ty: &Type) -> Option<(Type, Type)> {
    let Type::Path(p) = ty else { return None };
    if p.qself.is_some() {
        return None;
    }
    let last = p.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else { return None };
    let mut types = args.args.iter().filter_map(|a| match a {
        GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    });
    let (ok, err) = (types.next()?, types.next()?);
    (types.next().is_none() && args.args.len() == 2).then_some((ok, err))
}

fn is_context(ty: &Type) -> bool {
    match ty {
        Type::Path(p) => p.qself.is_none() && p.path.segments.last().is_some_and(|s| s.ident == "TccContext"),
        _ => false,
    }
}

/// `Some(db)` if `ty` is `SqlContext<db>` (by its last path segment, as written); `Some(None)` for a
/// `SqlContext` without its one type argument.
fn sql_context(ty: &Type) -> Option<Option<Type>> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last().filter(|s| p.qself.is_none() && s.ident == "SqlContext")?;
    let PathArguments::AngleBracketed(args) = &last.arguments else { return Some(None) };
    match args.args.iter().collect::<Vec<_>>().as_slice() {
        [GenericArgument::Type(db)] => Some(Some(db.clone())),
        _ => Some(None),
    }
}

/// Checks one method's signature; `None` when it cannot take part in the further checks.
fn method(f: &TraitItemFn, errors: &mut Errors) -> Option<Method> {
    let sig = &f.sig;
    let name = sig.ident.unraw().to_string();
    if sig.asyncness.is_none() {
        let at: &dyn ToTokens = match &sig.constness {
            Some(c) => c,
            None => &sig.fn_token,
        };
        errors.at(at, format!("`{name}` must be an `async fn`: TCC methods are async (`async fn {name}(&self, ctx: TccContext, ...)`)"));
    }
    if let Some(c) = &sig.constness {
        errors.at(c, "a TCC method cannot be `const`");
    }
    if let Some(u) = &sig.unsafety {
        errors.at(u, "a TCC method cannot be `unsafe`");
    }
    if let Some(abi) = &sig.abi {
        errors.at(abi, "a TCC method cannot have an ABI");
    }
    if let Some(v) = &sig.variadic {
        errors.at(v, "a TCC method cannot be variadic");
    }
    let generic = !sig.generics.params.is_empty() || sig.generics.where_clause.is_some();
    if !sig.generics.params.is_empty() {
        errors.at(
            &sig.generics,
            format!("`{name}` cannot be generic: its parameters and result travel as JSON, so their types are fixed"),
        );
    } else if let Some(w) = &sig.generics.where_clause {
        errors.at(w, format!("`{name}` cannot have a `where` clause: TCC methods are not generic"));
    }

    let mut inputs = sig.inputs.iter().peekable();
    match inputs.peek() {
        Some(FnArg::Receiver(r)) if r.reference.is_some() && r.mutability.is_none() && r.colon_token.is_none() => {}
        Some(FnArg::Receiver(r)) if r.mutability.is_some() && r.reference.is_some() => errors.at(
            r,
            format!("`{name}` takes `&mut self`: a participant serves calls concurrently, so TCC methods take `&self` (keep state in the TccContext or behind a lock)"),
        ),
        Some(FnArg::Receiver(r)) => {
            errors.at(r, format!("`{name}` must take `&self`: one implementation serves every call"));
        }
        Some(FnArg::Typed(_)) | None => {
            errors.at(&sig.ident, format!("`{name}` must take `&self` first: one implementation serves every call"));
        }
    }
    if let Some(FnArg::Receiver(_)) = inputs.peek() {
        inputs.next();
    }

    let mut ok = true;
    let mut store = (Store::Sled, sig.ident.span());
    match inputs.next() {
        Some(FnArg::Typed(t)) if is_context(&t.ty) => store.1 = t.ty.span(),
        Some(FnArg::Typed(t)) if matches!(&*t.ty, Type::Reference(r) if is_context(&r.elem)) => {
            errors.at(&t.ty, "take the TccContext by value: `ctx: TccContext`");
        }
        Some(FnArg::Typed(t)) => match &*t.ty {
            Type::Reference(r) if r.mutability.is_some() => match sql_context(&r.elem) {
                Some(Some(db)) => store = (Store::Sql(Box::new(db)), t.ty.span()),
                Some(None) => {
                    errors.at(
                        &r.elem,
                        "name the database: `ctx: &mut SqlContext<Postgres>` or `&mut SqlContext<MySql>`",
                    );
                    ok = false;
                }
                None => {
                    errors.at(t, format!("`{name}` must take `ctx: TccContext` or `ctx: &mut SqlContext<DB>` as its first parameter after `&self`"));
                    ok = false;
                }
            },
            Type::Reference(r) if sql_context(&r.elem).is_some() => {
                errors.at(&t.ty, "take the SqlContext by mutable reference: `ctx: &mut SqlContext<DB>`: the method runs its statements on the call's transaction");
                ok = false;
            }
            ty if sql_context(ty).is_some() => {
                errors.at(&t.ty, "take the SqlContext by mutable reference: `ctx: &mut SqlContext<DB>`: the runtime commits the call's transaction after the method returns");
                ok = false;
            }
            _ => {
                errors.at(t, format!("`{name}` must take `ctx: TccContext` or `ctx: &mut SqlContext<DB>` as its first parameter after `&self`"));
                ok = false;
            }
        },
        Some(other) => {
            errors.at(
                other,
                format!("`{name}` must take `ctx: TccContext` as its first parameter after `&self`"),
            );
            ok = false;
        }
        None => {
            let at: &dyn ToTokens = if sig.inputs.is_empty() { &sig.ident } else { &sig.inputs };
            errors
                .at(at, format!("`{name}` must take `ctx: TccContext` as its first parameter after `&self`"));
        }
    }

    let mut params = Vec::new();
    for (i, input) in inputs.enumerate() {
        let FnArg::Typed(t) = input else { continue };
        match &*t.ty {
            Type::Reference(_) => {
                errors
                    .at(&t.ty, "TCC parameters are taken by value: they are decoded from JSON for each call");
                ok = false;
            }
            Type::ImplTrait(_) => {
                errors.at(
                    &t.ty,
                    format!(
                        "`{name}` cannot be generic: its parameters travel as JSON, so their types are fixed"
                    ),
                );
                ok = false;
            }
            _ => {}
        }
        let pname = match &*t.pat {
            Pat::Ident(p) if p.subpat.is_none() => p.ident.clone(),
            _ => {
                // A name for the client's parameter, unless the method already uses it.
                let taken = sig.inputs.iter().any(|a| {
                    matches!(a, FnArg::Typed(t) if matches!(&*t.pat, Pat::Ident(p) if p.ident == format!("arg{i}")))
                });
                if taken { format_ident!("__tcc_arg{}", i) } else { format_ident!("arg{}", i) }
            }
        };
        params.push(Param { name: pname, ty: (*t.ty).clone() });
    }

    let (ok_ty, err_ty) = match &sig.output {
        ReturnType::Type(_, ty) => match result_types(ty) {
            Some(types) => types,
            None => {
                errors.at(ty, format!("`{name}` must return `Result<T, E>`: its error is the business refusal sent back to the initiator"));
                return None;
            }
        },
        ReturnType::Default => {
            errors.at(&sig.ident, format!("`{name}` must return `Result<T, E>`: its error is the business refusal sent back to the initiator"));
            return None;
        }
    };
    (ok && !generic).then(|| Method {
        attrs: f.attrs.iter().filter(|a| !is_tcc(a)).cloned().collect(),
        sig: sig.clone(),
        default: f.default.clone(),
        params,
        ok: ok_ty,
        err: err_ty,
        store,
    })
}

/// Validates `item` with the trait's arguments `args`; every error found, or the model.
pub fn service(args: TraitArgs, mut item: ItemTrait, errors: &mut Errors) -> Option<Service> {
    let trait_name = item.ident.unraw().to_string();
    if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
        errors.at(
            &item.generics,
            "a #[tcc] trait cannot be generic: its operations travel as JSON, so their types are fixed",
        );
    }
    if let Some(u) = &item.unsafety {
        errors.at(u, "a #[tcc] trait cannot be `unsafe`");
    }
    if let Some(a) = &item.auto_token {
        errors.at(a, "a #[tcc] trait cannot be an auto trait");
    }
    let client = args.client.unwrap_or_else(|| format_ident!("{}Client", item.ident.unraw()));
    if client == item.ident {
        errors.at(&client, format!("the client stub cannot have the trait's own name `{trait_name}`"));
    }
    let krate = args.krate.unwrap_or_else(|| syn::parse_quote!(::tcc_http));

    // Methods, with their operation arguments when they are tries.
    let mut methods: Vec<Option<Method>> = Vec::new();
    let mut names: Vec<Ident> = Vec::new();
    let mut op_args: Vec<Option<OperationArgs>> = Vec::new();
    for trait_item in &item.items {
        let TraitItem::Fn(f) = trait_item else {
            errors.at(
                trait_item,
                "a #[tcc] trait holds TCC methods only (no associated types, constants or macros)",
            );
            continue;
        };
        let mut args = None;
        for attr in f.attrs.iter().filter(|a| is_tcc(a)) {
            if args.is_some() {
                errors.at(attr, "duplicate #[tcc(...)] attribute: put every argument in one");
            } else {
                args = Some(OperationArgs::parse(attr, errors));
            }
        }
        names.push(f.sig.ident.clone());
        methods.push(method(f, errors));
        op_args.push(args);
    }
    let index: HashMap<String, usize> =
        names.iter().enumerate().map(|(i, n)| (n.unraw().to_string(), i)).collect();

    // Operations and steps: resolve confirm, cancel and compensation, each method used once, with
    // the parameters of the method it serves.
    let mut ops = Vec::new();
    let mut steps = Vec::new();
    let mut actions = Vec::new();
    // What each method is used as: (the index of the method it serves, its role's noun).
    let mut used: HashMap<usize, (usize, &'static str)> = HashMap::new();
    // The trait's branch ids, each with the operation and the literal that gave it.
    let mut branches: HashMap<String, (usize, Option<&syn::LitStr>)> = HashMap::new();
    // Some operation's confirm or cancel, or a step's compensation, could not be resolved: an
    // unused method may be the one meant, so it is not reported on its own.
    let mut broken = false;
    for (t, args) in op_args.iter().enumerate() {
        let Some(args) = args else { continue };
        let try_name = names[t].unraw().to_string();
        // `role` is (verb, noun): "confirm", "cancel", or ("compensate", "compensation").
        let mut resolve = |role: (&'static str, &'static str),
                           id: &Option<Ident>,
                           errors: &mut Errors|
         -> Option<usize> {
            let (verb, noun) = role;
            let Some(id) = id else {
                if !args.unreadable {
                    errors.at(&args.span_of, format!("`{try_name}` needs `{verb} = method`: every TCC operation has a confirm and a cancel"));
                }
                return None;
            };
            let wanted = id.unraw().to_string();
            let Some(&m) = index.get(&wanted) else {
                // The closest name of a method without its own attribute, when it is close enough
                // to be a typo.
                let guess = names
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| op_args[*i].is_none())
                    .map(|(_, n)| (distance(&wanted, &n.unraw().to_string()), n.unraw().to_string()))
                    .filter(|(d, n)| *d <= (n.len().max(wanted.len()) / 3).max(1))
                    .min();
                let hint = guess.map_or_else(String::new, |(_, n)| format!(": did you mean `{n}`?"));
                errors.at(
                    id,
                    format!("no method `{wanted}` in trait `{trait_name}` to {verb} `{try_name}`{hint}"),
                );
                return None;
            };
            if let Some(other) = &op_args[m] {
                let what = match other.kind {
                    Kind::Try => "a TCC operation's try",
                    Kind::Step => "a saga step's action",
                    Kind::Action => "a message action",
                };
                errors.at(
                    id,
                    format!(
                        "`{}` is {what} (it has its own #[tcc(...)]); a {noun} method has no attribute",
                        id.unraw()
                    ),
                );
                return None;
            }
            if let Some(&(other, role_there)) = used.get(&m) {
                let other = names[other].unraw();
                let what = if other == try_name { "this operation".to_owned() } else { format!("`{other}`") };
                let rule = if noun == "compensation" && role_there == noun {
                    "each saga step has its own compensation method".to_owned()
                } else if noun == "compensation" || role_there == "compensation" {
                    format!("one method cannot be both a {role_there} and a {noun}")
                } else {
                    format!("each operation has its own {noun} method")
                };
                errors.at(id, format!("`{}` is already the {role_there} of {what}: {rule}", id.unraw()));
                return None;
            }
            used.insert(m, (t, noun));
            Some(m)
        };

        match args.kind {
            Kind::Try => {}
            Kind::Step => {
                let compensate = resolve(("compensate", "compensation"), &args.compensate, errors);
                broken |= compensate.is_none() || args.unreadable;
                if let Some(action) = &methods[t] {
                    unit_result(
                        action,
                        "a saga step's action has no result to pass on: the coordinator only hears that it was done or refused",
                        errors,
                    );
                    if let Some(Some(c)) = compensate.map(|c| methods[c].as_ref()) {
                        fits(c, action, ("action", "compensates"), errors);
                    }
                }
                if let Some(compensate) = compensate {
                    steps.push(SagaStep { action: t, compensate });
                }
                continue;
            }
            Kind::Action => {
                broken |= args.unreadable;
                if let Some(action) = &methods[t] {
                    unit_result(
                        action,
                        "a message action has no result to pass on: nobody waits for it",
                        errors,
                    );
                }
                actions.push(t);
                continue;
            }
        }
        let confirm = resolve(("confirm", "confirm"), &args.confirm, errors);
        let cancel = resolve(("cancel", "cancel"), &args.cancel, errors);
        broken |= confirm.is_none() || cancel.is_none();

        // Parameters and results must fit the try's.
        if let Some(try_m) = &methods[t] {
            for (role, m) in [("confirms", confirm), ("cancels", cancel)] {
                let Some(Some(m)) = m.map(|m| methods[m].as_ref()) else { continue };
                fits(m, try_m, ("try", role), errors);
            }
        }

        // The client stub's default branch id, unique within the trait.
        let branch = match &args.branch {
            Some(lit) => {
                let b = lit.value();
                if !valid_branch(&b) {
                    errors.at(lit, format!("`{b}` is not a branch id: 1 to {MAX_BRANCH_ID} ASCII letters, digits, '-', '_', '.' or ':'"));
                }
                b
            }
            None => {
                let b = format!("{trait_name}.{try_name}");
                if !valid_branch(&b) {
                    errors.at(&names[t], format!("the default branch id `{b}` is not valid (ASCII letters, digits, '-', '_', '.', ':', at most {MAX_BRANCH_ID} bytes): give one with `branch = \"...\"`"));
                }
                b
            }
        };
        if let Some(&(other, other_lit)) = branches.get(&branch) {
            // Point at a declared id rather than at a default one.
            let at: &dyn ToTokens = match (&args.branch, other_lit) {
                (Some(lit), _) => lit,
                (None, Some(lit)) => lit,
                (None, None) => &names[t],
            };
            let (first, second) =
                if args.branch.is_none() && other_lit.is_some() { (t, other) } else { (other, t) };
            errors.at(at, format!(
                "branch id `{branch}` of `{}` is already the one of `{}`: two operations of one transaction need two branches",
                names[second].unraw(), names[first].unraw()
            ));
        } else {
            branches.insert(branch.clone(), (t, args.branch.as_ref()));
        }
        if let (Some(confirm), Some(cancel)) = (confirm, cancel) {
            ops.push(Operation { try_: t, confirm, cancel, branch });
        }
    }

    // Every method plays a part, and none takes a name the attribute generates.
    for (i, name) in names.iter().enumerate() {
        let text = name.unraw().to_string();
        if op_args[i].is_none() && !used.contains_key(&i) && !broken {
            errors.at(name, format!(
                "`{text}` is not part of a TCC operation, saga step or message action: mark a try with `#[tcc(confirm = ..., cancel = ...)]`, a step's action with `#[tcc(compensate = ...)]` or a message action with `#[tcc(action)]`, or name this method as some method's confirm, cancel or compensation"
            ));
        }
        if text == INTO_PARTICIPANT {
            errors.at(name, format!("`{text}` clashes with the method `{trait_name}::{INTO_PARTICIPANT}` generated by #[tcc]: rename it"));
        }
        if op_args[i].is_some() && CLIENT_METHODS.contains(&text.as_str()) {
            errors.at(name, format!("`{text}` clashes with `{client}::{text}`, generated by #[tcc] for the client stub: rename the operation"));
        }
        if op_args[i].is_some() && (text.len() > MAX_OPERATION_NAME || !text.is_ascii()) {
            errors.at(name, format!("the operation name `{text}` must be at most {MAX_OPERATION_NAME} ASCII characters: it is a URL path segment"));
        }
    }
    if op_args.iter().all(Option::is_none) {
        errors.at(&item.ident, format!(
            "`{trait_name}` declares no TCC operation, saga step or message action: mark a try method with `#[tcc(confirm = ..., cancel = ...)]`, a step's action with `#[tcc(compensate = ...)]` or a message action with `#[tcc(action)]`"
        ));
    }

    item.items.clear();
    item.attrs.retain(|a| !is_tcc(a));
    if !errors.is_empty() {
        return None;
    }
    let methods: Vec<Method> = methods.into_iter().flatten().collect();
    // With no errors, every method was modelled, so indexes still match.
    // One participant serves every method: they all run on one store.
    let store = methods.first().map_or(Store::Sled, |m| m.store.0.clone());
    if let Some(first) = methods.first() {
        for m in &methods[1..] {
            if !m.store.0.same(&store) {
                errors.push(syn::Error::new(
                    m.store.1,
                    format!(
                        "`{}` takes {} but `{}` takes {}: the methods of one #[tcc] trait run on one participant, so they take the same context",
                        m.name(),
                        m.store.0.describe(),
                        first.name(),
                        store.describe()
                    ),
                ));
            }
        }
    }
    (methods.len() == names.len()).then_some(Service {
        item,
        krate,
        client,
        methods,
        ops,
        steps,
        actions,
        store,
    })
}

fn is_unit(ty: &Type) -> bool {
    matches!(ty, Type::Tuple(t) if t.elems.is_empty())
}

/// `m` (a step's or a message's action) returns `Result<(), E>`; `why` says why, at its `T`.
fn unit_result(m: &Method, why: &str, errors: &mut Errors) {
    if !is_unit(&m.ok) {
        errors.at(&m.ok, format!("`{}` must return `Result<(), {}>`: {why}", m.name(), type_text(&m.err)));
    }
}

/// `m` (a confirm, cancel or compensation) takes the parameters of `of` (the try or action it
/// serves) and returns `Result<(), E>` with `of`'s `E`. `role` is (what `of` is, what `m` does to
/// it): ("try", "confirms"), ("action", "compensates").
fn fits(m: &Method, of: &Method, role: (&str, &str), errors: &mut Errors) {
    let (of_role, verb) = role;
    let of_name = of.name();
    let same_params = m.params.len() == of.params.len()
        && m.params.iter().zip(&of.params).all(|(a, b)| same_type(&a.ty, &b.ty));
    if !same_params {
        let want: Vec<String> = of.params.iter().map(|p| type_text(&p.ty)).collect();
        let ctx = match &of.store.0 {
            Store::Sled => "TccContext".to_owned(),
            Store::Sql(db) => format!("&mut SqlContext<{}>", type_text(db)),
        };
        errors.at(&m.sig.inputs, format!(
            "`{}` must take the same parameters as the {of_role} it {verb}, `{of_name}`: (&self, ctx: {ctx}{}{})",
            m.name(), if want.is_empty() { "" } else { ", " }, want.join(", ")
        ));
    }
    if !is_unit(&m.ok) || !same_type(&m.err, &of.err) {
        let ReturnType::Type(_, ty) = &m.sig.output else { return };
        let noun = match verb {
            "confirms" => "confirm",
            "cancels" => "cancel",
            _ => "compensation",
        };
        errors.at(ty, format!(
            "`{}` must return `Result<(), {}>`: the {noun} of `{of_name}` has nothing to return and fails with the {of_role}'s error type",
            m.name(), type_text(&of.err)
        ));
    }
}

/// The trait with `#[tcc]` helper attributes removed, for output next to errors (so that uses of the
/// trait elsewhere do not add errors of their own).
pub fn stripped(mut item: ItemTrait) -> ItemTrait {
    item.attrs.retain(|a| !is_tcc(a));
    for trait_item in &mut item.items {
        if let TraitItem::Fn(f) = trait_item {
            f.attrs.retain(|a| !is_tcc(a));
        }
    }
    item
}

/// Levenshtein distance, for "did you mean" hints.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
