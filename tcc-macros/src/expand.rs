//! `#[tcc]` as a plain function of token streams: parse, validate, render.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote};

use crate::attrs::TraitArgs;
use crate::errors::Errors;
use crate::{model, render_client, render_server};

/// Expands `#[tcc(attr)] item`: the rewritten trait and the client stub, or every
/// error found.
pub fn expand(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let mut errors = Errors::default();
    let args = TraitArgs::parse(attr, &mut errors);
    let item = match syn::parse2::<syn::Item>(item)? {
        syn::Item::Trait(t) => t,
        other => {
            // Point at the item's first token (its keyword, usually), not at the whole item.
            let first =
                other.into_token_stream().into_iter().next().map_or_else(Span::call_site, |t| t.span());
            errors.push(syn::Error::new(
                first,
                "#[tcc] goes on a trait: `#[tcc] pub trait Flights { ... }` defines a TCC service",
            ));
            return errors.finish().map(|()| TokenStream::new());
        }
    };
    let service = model::service(args, item, &mut errors);
    errors.finish()?;
    let Some(service) = service else {
        return Err(syn::Error::new(Span::call_site(), "#[tcc] could not read this trait"));
    };
    let server = render_server::render(&service);
    let client = render_client::render(&service);
    Ok(quote! {
        #server
        #client
    })
}

/// What the macro emits when [`expand`] fails: the errors, and the trait without the helper
/// attributes, so that code using the trait does not add errors of its own.
pub fn with_errors(error: syn::Error, item: TokenStream) -> TokenStream {
    let errors = error.to_compile_error();
    match syn::parse2::<syn::ItemTrait>(item) {
        Ok(t) => {
            let t = model::stripped(t);
            quote! {
                #errors
                #[allow(async_fn_in_trait)]
                #t
            }
        }
        Err(_) => errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syn::{ImplItem, Item, TraitItem, TraitItemFn};

    fn flights(extra: TokenStream) -> TokenStream {
        quote! {
            /// Flights.
            pub trait Flights {
                /// Holds a seat.
                #[tcc(confirm = sell_seat, cancel = release_seat #extra)]
                async fn hold_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<SeatHold, FlightError>;
                async fn sell_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<(), FlightError>;
                async fn release_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<(), FlightError>;
            }
        }
    }

    fn expand_ok(attr: TokenStream, item: TokenStream) -> syn::File {
        let out = expand(attr, item).unwrap_or_else(|e| panic!("expected an expansion, got: {e}"));
        syn::parse2(out).unwrap_or_else(|e| panic!("the expansion does not parse: {e}"))
    }

    fn messages(attr: TokenStream, item: TokenStream) -> Vec<String> {
        match expand(attr, item) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    fn text(file: &syn::File) -> String {
        file.to_token_stream().to_string()
    }

    #[test]
    fn a_service_becomes_a_send_trait_with_into_participant_and_a_client_stub() {
        let file = expand_ok(quote!(), flights(quote!()));
        // The client stub comes wrapped in `client_side! { ... }`, kept by tcc-http's `client` feature.
        let [Item::Trait(service), Item::Macro(client_side)] = file.items.as_slice() else {
            panic!("expected the trait and the client side: {}", text(&file));
        };
        assert!(client_side.mac.path.to_token_stream().to_string().ends_with("__private :: client_side"));
        let client_file: syn::File = syn::parse2(client_side.mac.tokens.clone()).expect("client side items");
        let [Item::Struct(client), Item::Impl(client_impl)] = client_file.items.as_slice() else {
            panic!("expected the client struct and its impl: {}", text(&client_file));
        };
        assert_eq!(service.ident, "Flights");
        assert_eq!(client.ident, "FlightsClient");
        let bounds = service.supertraits.to_token_stream().to_string();
        assert!(bounds.contains("Send") && bounds.contains("Sync") && bounds.contains("'static"), "{bounds}");
        assert!(!service.attrs.iter().any(|a| a.path().is_ident("tcc")));

        // `into_participant` comes wrapped in `participant_side! { ... }`, kept by tcc-http's
        // `participant` feature.
        let methods: Vec<(String, bool)> = service
            .items
            .iter()
            .filter_map(|i| match i {
                TraitItem::Fn(f) => Some((f.sig.ident.to_string(), f.sig.asyncness.is_some())),
                TraitItem::Macro(m)
                    if m.mac.path.to_token_stream().to_string().ends_with("participant_side") =>
                {
                    let f: TraitItemFn =
                        syn::parse2(m.mac.tokens.clone()).expect("the participant side's method");
                    Some((f.sig.ident.to_string(), f.sig.asyncness.is_some()))
                }
                _ => None,
            })
            .collect();
        let names: Vec<&str> = methods.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["hold_seat", "sell_seat", "release_seat", "into_participant"]);
        assert!(methods.iter().all(|(_, is_async)| !is_async), "async fns become fns returning Send futures");
        let TraitItem::Fn(hold) = &service.items[0] else { unreachable!() };
        let ret = hold.sig.output.to_token_stream().to_string();
        assert!(
            ret.contains("Future < Output = Result < SeatHold , FlightError > >") && ret.contains("Send"),
            "{ret}"
        );
        assert!(!hold.attrs.iter().any(|a| a.path().is_ident("tcc")), "the helper attribute is gone");

        let client_fns: Vec<(String, bool)> = client_impl
            .items
            .iter()
            .filter_map(|i| match i {
                ImplItem::Fn(f) => Some((f.sig.ident.to_string(), f.sig.asyncness.is_some())),
                _ => None,
            })
            .collect();
        let expected = [
            ("new", false),
            ("base_url", false),
            ("with_branch", false),
            ("with_try_attempts", false),
            ("hold_seat", true),
        ];
        assert_eq!(client_fns, expected.map(|(n, a)| (n.to_owned(), a)), "only the tries are client methods");
    }

    #[test]
    fn generated_paths_are_absolute_through_the_runtime_crate() {
        let out = text(&expand_ok(quote!(), flights(quote!())));
        assert!(out.contains(":: tcc_http :: __private :: AsyncOperation"), "{out}");
        assert!(out.contains(":: tcc_http :: __private :: ServiceStub"));
        assert!(out.contains(":: core :: future :: Future"));
        assert_eq!(out.matches("Arc").count(), out.matches(":: std :: sync :: Arc").count(), "{out}");
        let renamed =
            text(&expand_ok(quote!(crate = ::my_api::tcc, client = FlightsStub), flights(quote!())));
        assert!(renamed.contains(":: my_api :: tcc :: __private :: Participant"), "{renamed}");
        assert!(!renamed.contains("tcc_http"), "{renamed}");
        assert!(renamed.contains("struct FlightsStub"));
    }

    #[test]
    fn the_default_branch_id_is_trait_dot_operation_and_can_be_declared() {
        let out = text(&expand_ok(quote!(), flights(quote!())));
        assert!(out.contains("\"hold_seat\" , \"Flights.hold_seat\""), "{out}");
        let out = text(&expand_ok(quote!(), flights(quote!(, branch = "seat"))));
        assert!(out.contains("\"hold_seat\" , \"seat\""), "{out}");
    }

    #[test]
    fn several_parameters_travel_as_a_tuple_and_none_as_unit() {
        let item = quote! {
            trait Bank {
                #[tcc(confirm = c, cancel = x)]
                async fn transfer(&self, ctx: TccContext, from: String, cents: u64) -> Result<(), E>;
                async fn c(&self, ctx: TccContext, from: String, cents: u64) -> Result<(), E>;
                async fn x(&self, ctx: TccContext, _: String, _: u64) -> Result<(), E>;
                #[tcc(confirm = c2, cancel = x2)]
                async fn ping(&self, ctx: TccContext) -> Result<u8, E>;
                async fn c2(&self, ctx: TccContext) -> Result<(), E>;
                async fn x2(&self, ctx: TccContext) -> Result<(), E>;
            }
        };
        let out = text(&expand_ok(quote!(), item));
        assert!(out.contains("type Request = (String , u64 ,) ;"), "{out}");
        assert!(out.contains("type Request = () ;"), "{out}");
        assert!(out.contains("& (from , cents ,)"), "the client sends the tuple: {out}");
    }

    #[test]
    fn every_error_is_reported_not_only_the_first() {
        let item = quote! {
            trait Flights {
                #[tcc(confirm = sel, cancel = release, timeout = 5)]
                fn hold(&mut self, seat: Seat) -> Seat;
                async fn sell(&self, ctx: TccContext, seat: Seat) -> Result<(), E>;
                async fn release<T>(&self, ctx: TccContext, seat: T) -> Result<(), E>;
            }
        };
        let errors = messages(quote!(), item);
        let expected = [
            "unknown argument `timeout`",
            "`hold` must be an `async fn`",
            "`hold` takes `&mut self`",
            "`hold` must take `ctx: TccContext`",
            "`hold` must return `Result<T, E>`",
            "`release` cannot be generic",
            "no method `sel` in trait `Flights` to confirm `hold`: did you mean `sell`?",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (got, want) in errors.iter().zip(expected) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
    }

    #[test]
    fn operation_wiring_mistakes_are_errors() {
        let item = quote! {
            trait Flights {
                #[tcc(confirm = sell, cancel = release)]
                async fn hold_seat(&self, ctx: TccContext, seat: Seat) -> Result<(), E>;
                #[tcc(confirm = sell, cancel = hold_seat)]
                async fn hold_meal(&self, ctx: TccContext, seat: Seat) -> Result<(), E>;
                async fn sell(&self, ctx: TccContext, seat: String) -> Result<u8, E>;
                async fn release(&self, ctx: TccContext, seat: Seat) -> Result<(), E>;
                async fn into_participant(&self, ctx: TccContext) -> Result<(), E>;
            }
        };
        let errors = messages(quote!(), item).join("\n");
        for want in [
            "`sell` must take the same parameters as the try it confirms, `hold_seat`",
            "`sell` must return `Result<(), E>`",
            "`sell` is already the confirm of `hold_seat`",
            "`hold_seat` is a TCC operation's try",
            "`into_participant` clashes with the method `Flights::into_participant`",
        ] {
            assert!(errors.contains(want), "missing {want:?} in:\n{errors}");
        }
    }

    fn loyalty(ctx: TokenStream) -> TokenStream {
        quote! {
            trait Loyalty {
                #[tcc(compensate = debit)]
                async fn credit(&self, ctx: #ctx, customer: String, points: u32) -> Result<(), E>;
                async fn debit(&self, ctx: #ctx, customer: String, points: u32) -> Result<(), E>;
                #[tcc(action)]
                async fn welcome(&self, ctx: #ctx, customer: String) -> Result<(), E>;
            }
        }
    }

    #[test]
    fn saga_steps_and_message_actions_are_registered_and_get_client_methods() {
        let file = expand_ok(quote!(), loyalty(quote!(TccContext)));
        let out = text(&file);
        assert!(out.contains(". async_step (\"credit\" , __TccStep0"), "{out}");
        assert!(out.contains(". async_action (\"welcome\" , __TccAction0"), "{out}");
        assert!(out.contains(":: tcc_http :: __private :: AsyncStep for __TccStep0"), "{out}");
        assert!(out.contains(":: tcc_http :: __private :: AsyncAction for __TccAction0"), "{out}");
        // The compensation gets the action's parameters back from the one request.
        assert!(out.contains("type Request = (String , u32 ,) ;"), "{out}");
        assert!(out.contains("fn compensate"), "{out}");
        // The client adds the step and the action to builders; it sends nothing itself.
        assert!(out.contains("pub fn credit (& self , saga : :: tcc_http :: __private :: SagaBuilder , customer : String , points : u32)"), "{out}");
        assert!(
            out.contains("saga_step :: < (String , u32 ,) > (saga , \"credit\" , & (customer , points ,))"),
            "{out}"
        );
        assert!(out.contains("pub fn welcome (& self , message : :: tcc_http :: __private :: MessageBuilder , customer : String)"), "{out}");
        assert!(out.contains("message_action :: < String > (message , \"welcome\" , & customer)"), "{out}");

        let sql = text(&expand_ok(quote!(), loyalty(quote!(&mut SqlContext<Postgres>))));
        assert!(sql.contains(". sql_step (\"credit\""), "{sql}");
        assert!(sql.contains(". sql_action (\"welcome\""), "{sql}");
        assert!(sql.contains("SqlStep for __TccStep0") && sql.contains("type Db = Postgres ;"), "{sql}");
    }

    #[test]
    fn step_wiring_mistakes_are_errors() {
        let item = quote! {
            trait Loyalty {
                #[tcc(confirm = redeem, cancel = release)]
                async fn hold(&self, ctx: TccContext, p: Points) -> Result<(), E>;
                async fn redeem(&self, ctx: TccContext, p: Points) -> Result<(), E>;
                async fn release(&self, ctx: TccContext, p: Points) -> Result<(), E>;
                #[tcc(compensate = release)]
                async fn credit(&self, ctx: TccContext, p: Points) -> Result<u32, E>;
                #[tcc(compensate = undo)]
                async fn bonus(&self, ctx: TccContext, p: Points) -> Result<(), E>;
                async fn undo(&self, ctx: TccContext, p: u32) -> Result<(), F>;
                #[tcc(action, compensate = undo)]
                async fn welcome(&self, ctx: TccContext, p: Points) -> Result<(), E>;
                #[tcc(compensate = undo, cancel = release)]
                async fn gift(&self, ctx: TccContext, p: Points) -> Result<(), E>;
            }
        };
        let errors = messages(quote!(), item).join("\n");
        for want in [
            "`credit` must return `Result<(), E>`: a saga step's action has no result",
            "`release` is already the cancel of `hold`: one method cannot be both a cancel and a compensation",
            "`undo` must take the same parameters as the action it compensates, `bonus`",
            "`undo` must return `Result<(), E>`: the compensation of `bonus`",
            "`action` makes this method a message action, which has no `compensate`",
            "`compensate` makes this method a saga step's action, which has no `cancel`",
            "`undo` is already the compensation of `bonus`: each saga step has its own compensation method",
        ] {
            assert!(errors.contains(want), "missing {want:?} in:\n{errors}");
        }
    }

    #[test]
    fn only_traits_take_the_attribute() {
        let errors = messages(
            quote!(),
            quote!(
                struct Flights;
            ),
        );
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("#[tcc] goes on a trait"), "{errors:?}");
        let errors = messages(quote!(client = A, client = B, port = 80), flights(quote!()));
        assert_eq!(
            errors,
            ["duplicate argument `client`", "unknown argument `port`: expected one of `client`, `crate`"]
        );
    }

    #[test]
    fn on_errors_the_trait_is_kept_without_its_helper_attributes() {
        let item = flights(quote!(, nonsense = 1));
        let error = expand(quote!(), item.clone()).expect_err("unknown argument");
        let out = with_errors(error, item).to_string();
        assert!(out.contains("compile_error"), "{out}");
        assert!(out.contains("trait Flights"), "{out}");
        assert!(!out.contains("# [tcc"), "{out}");
    }
}
